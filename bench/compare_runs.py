"""Compare evaluation runs (results.json of `editserve eval`) side by side: a Markdown table
of each metric at every checkpoint and an SVG plot of the curves.

    python bench/compare_runs.py RUN_A/results.json RUN_B/results.json --svg docs/plot.svg

A run's `rows.jsonl` (streamed while it runs) works too, for a run still going or cut off:
it is labelled by its folder's name.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

PANELS = (
    ("efficacy", "efficacy score (ES)"),
    ("paraphrase", "paraphrase score (PS)"),
    ("neighborhood", "neighborhood score (NS)"),
    ("perplexity", "probe perplexity"),
)


def curve(run: dict[str, Any]) -> list[dict[str, Any]]:
    """(edits applied, metrics) at the start (unedited), each checkpoint and the end."""
    rows = run["rows"]
    baseline = next((r for r in rows if r["kind"] == "baseline"), None)
    if baseline is None:
        raise SystemExit(f"{label(run)}: no baseline row yet (the run is still scoring it)")
    points = [{"edits": 0, **baseline["metrics"]}]
    points += [
        {"edits": r["edits_done"], **r["metrics"]}
        for r in rows
        if r["kind"] in ("checkpoint", "final")
    ]
    return points


def load(path: Path) -> dict[str, Any]:
    """A finished run's results.json, or the rows a run has streamed so far."""
    if path.suffix == ".jsonl":
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        return {"rows": rows, "name": path.parent.name}
    return json.loads(path.read_text())


def label(run: dict[str, Any]) -> str:
    if "summary" not in run:
        return run["name"]
    plan = run["summary"]["plan"]
    size = plan.get("batch_size") or 1
    return f"{plan['method']} ({plan['protocol']}, batches of {size})"


def table(runs: list[dict[str, Any]]) -> str:
    names = [name for name, _ in PANELS]
    header = "| run | edits | " + " | ".join(names) + " |"
    lines = [header, "|" + "---|" * (len(names) + 2)]
    for run in runs:
        for point in curve(run):
            cells = [_fmt(point.get(name)) for name in names]
            lines.append(f"| {label(run)} | {point['edits']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _fmt(value: float | None) -> str:
    if value is None:
        return "–"
    return f"{value:.1f}" if value > 1.5 else f"{100 * value:.1f} %"


def plot(runs: list[dict[str, Any]], path: Path) -> None:
    figure = Figure(figsize=(10, 6.5))
    axes = figure.subplots(2, 2).flatten()
    for axis, (name, title) in zip(axes, PANELS, strict=True):
        for run in runs:
            points = [p for p in curve(run) if p.get(name) is not None]
            axis.plot(
                [p["edits"] for p in points],
                [p[name] for p in points],
                marker=".",
                label=label(run),
            )
        axis.set_title(title)
        axis.set_xlabel("edits applied")
        axis.grid(alpha=0.3)
    axes[0].legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(path, format="svg")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("results", nargs="+", type=Path)
    parser.add_argument("--svg", type=Path, help="write the plot here")
    args = parser.parse_args()
    runs = [load(p) for p in args.results]
    print(table(runs))
    if args.svg:
        plot(runs, args.svg)


if __name__ == "__main__":
    main()
