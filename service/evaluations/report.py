"""An evaluation run's results as CSV (one line per row) and as a self-contained HTML report
(tables, and SVG plots of every metric over the sequence of edits)."""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from typing import Any

from jinja2 import Environment, PackageLoader, select_autoescape
from matplotlib.figure import Figure  # the object API: no global pyplot state, thread-safe
from matplotlib.ticker import MaxNLocator

from editors.evaluation import EvaluationRow

_ENV = Environment(
    loader=PackageLoader("service.evaluations", "templates"),
    autoescape=select_autoescape(["html"]),
)

# Metrics that belong on the 0..1 plot; the rest (perplexity, fluency, magnitudes) apart.
RATES = (
    "efficacy",
    "paraphrase",
    "neighborhood",
    "reliability",
    "generalization",
    "locality",
    "portability",
    "free_rewrite",
    "free_paraphrase",
    "free_locality",
    "free_portability",
    "multi_hop",
)
HEALTH = ("perplexity", "fluency")


def metric_names(rows: Sequence[EvaluationRow]) -> list[str]:
    names = [n for r in rows for n in (*r.metrics, *(r.baseline or {}))]
    known = [n for n in (*RATES, *HEALTH) if n in names]
    return known + sorted(set(names) - set(known))


ANSWER_COLUMNS = ("subject", "prompt", "target_new", "before", "after")


def to_csv(rows: Sequence[EvaluationRow]) -> str:
    """kind, edits_done, case_id, error, each metric and its baseline_ twin, then (for case
    rows) the subject, prompt, target and the model's answer before and after."""
    names = metric_names(rows)
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(
        [
            "kind",
            "edits_done",
            "case_id",
            "error",
            *names,
            *(f"baseline_{n}" for n in names),
            "subject",
            "prompt",
            "target_new",
            "answer_before",
            "answer_after",
        ]
    )
    for row in rows:
        base = row.baseline or {}
        answers = row.answers or {}
        writer.writerow(
            [
                row.kind,
                row.edits_done,
                row.case_id or "",
                row.error or "",
                *(_cell(row.metrics.get(n)) for n in names),
                *(_cell(base.get(n)) for n in names),
                *(answers.get(column, "") for column in ANSWER_COLUMNS),
            ]
        )
    return out.getvalue()


def _cell(value: float | None) -> str:
    return "" if value is None else f"{value:.6g}"


def _series(
    rows: Sequence[EvaluationRow], names: Sequence[str], isolated: bool
) -> dict[str, list[Any]]:
    """Each metric over the run: for a sequential run, over the edits applied (its checkpoint
    and final rows); for isolated runs (single, batch), where every case is edited alone
    from the unedited model, the running mean over the cases measured so far."""
    points = [r for r in rows if r.kind in ("checkpoint", "final")]
    if isolated or len(points) < 2:
        cases = [r for r in rows if r.kind == "case" and not r.error]
        points = []
        for index in range(1, len(cases) + 1):
            seen = cases[:index]
            mean = {
                n: _avg([v for r in seen if (v := r.metrics.get(n)) is not None]) for n in names
            }
            points.append(EvaluationRow("checkpoint", index, mean))
    series: dict[str, list[Any]] = {"x": [p.edits_done for p in points]}
    for name in names:
        series[name] = [p.metrics.get(name) for p in points]
    return series


def _avg(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _plot(
    series: dict[str, list[Any]], names: Sequence[str], title: str, ylabel: str, xlabel: str
) -> str:
    drawn = [n for n in names if any(v is not None for v in series.get(n, []))]
    if not drawn or len(series["x"]) < 2:
        return ""
    figure = Figure(figsize=(7.5, 3.6))
    axes = figure.subplots()
    for name in drawn:
        pairs = [(x, y) for x, y in zip(series["x"], series[name], strict=True) if y is not None]
        axes.plot([p[0] for p in pairs], [p[1] for p in pairs], marker=".", label=name)
    axes.set_xlabel(xlabel)
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_ylabel(ylabel)
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend(fontsize="small", loc="best")
    figure.tight_layout()
    buffer = io.StringIO()
    figure.savefig(buffer, format="svg")
    svg = buffer.getvalue()
    return svg[svg.index("<svg") :]


def to_html(title: str, summary: dict[str, Any], rows: Sequence[EvaluationRow]) -> str:
    names = metric_names(rows)
    isolated = summary.get("plan", {}).get("protocol") in ("single", "batch")
    series = _series(rows, names, isolated)
    xlabel = (
        "cases measured (each edited alone, from the unedited model)"
        if isolated
        else ("edits applied")
    )
    rates = [n for n in RATES if n in names]
    plots = [
        _plot(series, rates, "Edit metrics over the run", "rate", xlabel),
        *(_plot(series, [n], n.capitalize(), n, xlabel) for n in HEALTH if n in names),
    ]
    final = next((r for r in reversed(rows) if r.kind == "final"), None)
    baseline = next((r for r in rows if r.kind == "baseline"), None)
    return _ENV.get_template("report.html").render(
        title=title,
        summary=summary,
        names=names,
        columns=[n for n in (*RATES, *HEALTH) if n in names],  # the rest: the CSV
        final=final,
        baseline=baseline,
        curve=[r for r in rows if r.kind in ("checkpoint", "final")],
        cases=[r for r in rows if r.kind == "case"],
        plots=[p for p in plots if p],
        fmt=_fmt,
    )


def _fmt(value: float | None) -> str:
    if value is None:
        return "–"
    return f"{value:.3f}" if abs(value) < 1000 else f"{value:.4g}"
