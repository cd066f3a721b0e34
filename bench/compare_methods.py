"""Every editing method on one benchmark, single edits: one JSON, one README table.

    python bench/compare_methods.py --dataset counterfact --count 200 --methods rome
    python bench/compare_methods.py --dataset counterfact --count 200 --methods memit alphaedit
    python bench/compare_methods.py --dataset zsre --count 200
    python bench/compare_methods.py --table bench/results/comparison-counterfact.json

Each method runs the evaluation runner (`editors.evaluation`, the `single` protocol: each
case edited from the unedited model, scored, rolled back) over the first `--count` cases of
`counterfact` (split edit) or `zsre` (split eval, with portability questions). Per method the
JSON records the final metrics (means over the cases the method edited), the unedited
model's on the same cases, the seconds of each edit's computation alone (median and mean;
not the statistics, the prefixes or the scoring), the peak resident memory of the process
during the method's run, the cases the method refused, and the hyperparameters it used (its
family defaults). The unedited model's metrics over all cases are recorded once.

Peak memory is the process's VmHWM (peak resident set size, from /proc/self/status), reset
through /proc/self/clear_refs when the method's run starts, so it covers that run alone (the
loaded model included: it is resident throughout). Where the reset is not available it is
the process's lifetime peak (`ru_maxrss`), and the JSON says so.

The JSON is rewritten after each method and at each checkpoint of a method's run (every
`--checkpoint-every` cases), so a run that is cut off leaves valid JSON with the methods it
finished and how far the current one got (`completed: false`). A later invocation with the
same `--out`, dataset, count and model keeps the methods already there that it does not
run itself, so methods can be added one invocation at a time. SIGINT, SIGTERM or
`--stop-at HH:MM` (UTC) stop after the current case, keeping what was measured.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import io
import json
import re
import resource
import signal
import statistics
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.counterfact_rephrase_kinds import is_paraphrase_prompt
from bench.provenance import provenance, write_report
from editors.editor import Editor
from editors.errors import EditError
from editors.methods import METHODS
from editors.requests import EditRequest

RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT_MODEL = "smollm2-135m-instruct"
DATASETS = {"counterfact": "edit", "zsre": "eval"}  # dataset -> the split we report on
PREFERRED_ORDER = ("rome", "memit", "alphaedit", "nse", "grace", "ft-m", "ft-l")
STATUS = Path("/proc/self/status")
CLEAR_REFS = Path("/proc/self/clear_refs")
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
FREE = ("free_rewrite", "free_paraphrase")  # cases missing these are listed by id


def default_methods() -> list[str]:
    """Every registered method: the default (rome) first, then the others in a fixed order,
    then any method registered since, alphabetically."""
    known = [m for m in PREFERRED_ORDER if m in METHODS]
    return known + sorted(m for m in METHODS if m not in known)


def default_out(dataset: str, model: str) -> Path:
    suffix = "" if model == DEFAULT_MODEL else f"-{model}"
    return RESULTS / f"comparison-{dataset}{suffix}.json"


# -- peak memory ----------------------------------------------------------------------------


def _vm_hwm_kb() -> int | None:
    try:
        found = re.search(r"VmHWM:\s+(\d+)\s*kB", STATUS.read_text())
    except OSError:
        return None
    return int(found.group(1)) if found else None


def reset_peak_rss() -> str:
    """Start a new peak-RSS window; the name of what `peak_rss_mb` will then measure."""
    try:
        CLEAR_REFS.write_text("5")  # Linux >= 4.0: resets VmHWM to the current RSS
    except OSError:
        return "ru_maxrss (process lifetime peak: the reset was not available)"
    if _vm_hwm_kb() is None:
        return "ru_maxrss (process lifetime peak: VmHWM not available)"
    return "VmHWM since the method's run started (peak resident set size of the process)"


def peak_rss_mb() -> float:
    kb = _vm_hwm_kb()
    if kb is None:
        kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kB on Linux
    return round(kb / 1024, 1)


# -- timing the edits -----------------------------------------------------------------------


class TimedEditor(Editor):
    """The editor the runner drives, recording the seconds of each edit's computation (and
    of each refused one, apart)."""

    def __init__(self, editor: Editor) -> None:
        super().__init__(editor.model, editor.tok, editor.stats, editor.spec)
        self._prefixes = editor._prefixes  # share the sampled prefixes across methods
        self.edit_seconds: list[float] = []
        self.refused_seconds: list[float] = []

    def compute(self, *args: Any, **kwargs: Any) -> Any:
        began = time.perf_counter()
        try:
            result = super().compute(*args, **kwargs)
        except EditError:
            self.refused_seconds.append(time.perf_counter() - began)
            raise
        self.edit_seconds.append(time.perf_counter() - began)
        return result


def seconds_figures(seconds: Sequence[float]) -> dict[str, float | None]:
    if not seconds:
        return {"median": None, "mean": None, "total": 0.0}
    return {
        "median": round(statistics.median(seconds), 3),
        "mean": round(statistics.fmean(seconds), 3),
        "total": round(sum(seconds), 1),
    }


# -- one method -----------------------------------------------------------------------------


def run_method(
    editor: Editor,
    cases: Sequence[Any],
    method: str,
    checkpoint_every: int | None,
    fluency: bool,
    should_stop: Callable[[], bool],
    on_progress: Callable[[dict[str, Any]], None],
) -> dict[str, Any]:
    """`method` under the single protocol on `cases`: the entry the JSON keeps for it.
    `on_progress` gets the entry so far at each checkpoint (the cut-off run's figures)."""
    from editors.evaluation import EvaluationPlan, run_evaluation
    from editors.metrics import mean_metrics

    plan = EvaluationPlan(
        method=method,
        protocol="single",
        batch_size=1,
        checkpoint_every=checkpoint_every,
        fluency=fluency,
    )
    hparams = editor.hparams(method)
    timed = TimedEditor(editor)
    memory = reset_peak_rss()
    began = time.perf_counter()
    # statistics and prefixes now, so neither counts in the first edit's seconds
    editor.prepare_statistics(editor.statistics_layers(method))
    editor.prefixes(hparams)
    setup = time.perf_counter() - began
    refusals: list[dict[str, str]] = []
    misses: dict[str, list[str]] = {name: [] for name in FREE}  # case ids, for diagnosis

    def entry(summary: dict[str, Any], completed: bool, stopped_at: str | None) -> dict[str, Any]:
        return {
            "method": method,
            "completed": completed,
            "stopped_at": stopped_at,
            "cases": len(cases),
            "edited": len(timed.edit_seconds),
            "scored": sum(1 for r in rows if r.kind == "case" and not r.error),
            "refused": len(timed.refused_seconds),
            "refusals": refusals[:10],
            "free_generation_misses": misses,
            "metrics": summary.get("final"),
            "free_paraphrase_by_prompt_kind": free_paraphrase_by_kind(cases, rows),
            "baseline_same_cases": summary.get("final_baseline"),
            "baseline_all_cases": summary.get("baseline"),
            "seconds_per_edit": seconds_figures(timed.edit_seconds),
            "seconds": {
                "statistics_and_prefixes": round(setup, 1),
                **summary.get("seconds", {}),
                "wall": round(time.perf_counter() - began, 1),
            },
            "peak_rss_mb": peak_rss_mb(),
            "peak_rss_measures": memory,
            "hparams": dataclasses.asdict(hparams),
            "finished_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        }

    rows: list[Any] = []

    def record(row: Any) -> None:
        rows.append(row)
        if row.kind == "case" and row.error:
            refusals.append({"case": str(row.case_id), "error": row.error})
        elif row.kind == "case":
            for name in FREE:
                value = row.metrics.get(name)
                if value is not None and value < 1:
                    misses[name].append(str(row.case_id))
        if row.kind == "checkpoint":
            baseline = next((r.metrics for r in rows if r.kind == "baseline"), None)
            partial = {"final": row.metrics, "final_baseline": row.baseline, "baseline": baseline}
            on_progress(entry(partial, False, f"running: {row.edits_done} cases scored"))

    summary, _ = run_evaluation(timed, cases, plan, record=record, should_stop=should_stop)
    scored = [r for r in rows if r.kind == "case" and not r.error]
    if not summary["completed"] and scored:
        # a stopped run ends without a final row: the means over every case it scored, not
        # only those before its last checkpoint
        summary["final"] = mean_metrics([r.metrics for r in scored])
        summary["final_baseline"] = mean_metrics([r.baseline or {} for r in scored])
    return entry(summary, summary["completed"], summary["stopped_at"])


def free_paraphrase_by_kind(cases: Sequence[Any], rows: Sequence[Any]) -> dict[str, Any]:
    """Free paraphrase success apart for the cases whose rephrase prompt is a CounterFact
    paraphrase prompt (a generated sentence, then the paraphrase) and for those whose is a
    generation prompt (see bench/counterfact_rephrase_kinds.py); zsre's are all questions."""
    kind_of = {
        str(getattr(case, "case_id", None) or i): (
            "paraphrase_prompts"
            if any(is_paraphrase_prompt(p, case.subject) for p in case.paraphrases)
            else "generation_prompts"
        )
        for i, case in enumerate(cases)
        if isinstance(case, EditRequest) and case.paraphrases
    }
    scores: dict[str, list[float]] = {"paraphrase_prompts": [], "generation_prompts": []}
    for row in rows:
        value = row.metrics.get("free_paraphrase") if row.kind == "case" else None
        kind = kind_of.get(str(row.case_id))
        if value is not None and kind is not None and not row.error:
            scores[kind].append(value)
    return {
        kind: {
            "cases": len(values),
            "free_paraphrase": statistics.fmean(values) if values else None,
        }
        for kind, values in scores.items()
    }


# -- the report -----------------------------------------------------------------------------


def load_previous(out: Path, dataset: str, count: int, model: str) -> dict[str, Any]:
    """The methods an earlier run of the same comparison wrote to `out` (name -> entry)."""
    if not out.is_file():
        return {}
    try:
        old = json.loads(out.read_text())
    except ValueError:
        return {}
    same = (old.get("dataset"), old.get("count"), old.get("model")) == (dataset, count, model)
    return {m["method"]: m for m in old.get("methods", [])} if same else {}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dataset", choices=sorted(DATASETS), default="counterfact")
    parser.add_argument("--count", type=int, default=200, help="the first N cases")
    parser.add_argument("--methods", nargs="+", help="default: every method, rome first")
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--out", type=Path, help="default: bench/results/comparison-<dataset>")
    parser.add_argument(
        "--samples",
        type=int,
        default=20_000,
        help="statistics tokens (model-sampled); 20,000 as `editserve eval` and README's "
        "single-edit figures",
    )
    parser.add_argument("--corpus", help="statistics corpus (default: model-sampled text)")
    parser.add_argument("--checkpoint-every", type=int, default=20)
    parser.add_argument("--fluency", action="store_true", help="also the n-gram entropy probe")
    parser.add_argument("--stop-at", help="HH:MM (UTC): stop after the case running then")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (1: on a machine shared with other work, 2 threads on 2 busy cores "
        "ran a forward pass 7x slower than 1)",
    )
    parser.add_argument("--table", type=Path, nargs="+", help="print the Markdown table and exit")
    args = parser.parse_args(argv)
    if args.table:
        for path in args.table:
            print(markdown_table(json.loads(path.read_text())))
            print()
        return 0

    import torch

    from service.evaluations.sources import benchmark_cases, default_benchmark_dir

    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    methods = args.methods or default_methods()
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        parser.error(f"unknown methods {unknown}; available: {default_methods()}")
    out = args.out or default_out(args.dataset, args.model)
    split = DATASETS[args.dataset]
    cases = benchmark_cases(default_benchmark_dir(), args.dataset, split, args.count)
    deadline = _deadline(args.stop_at)
    stop = threading.Event()
    handlers = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in STOP_SIGNALS}
    try:
        return _compare(args, methods, out, split, cases, deadline, stop)
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        torch.set_num_threads(threads)


def _compare(
    args: argparse.Namespace,
    methods: list[str],
    out: Path,
    split: str,
    cases: list[Any],
    deadline: datetime.datetime | None,
    stop: threading.Event,
) -> int:
    """Run `methods` one after another, rewriting `out` as each goes (see the module doc)."""
    from editors.editor import corpus_statistics
    from editors.models import default_cache_dir, load_model

    def should_stop() -> bool:
        if deadline is not None and datetime.datetime.now(datetime.UTC) >= deadline:
            stop.set()
        return stop.is_set()

    model, tok = load_model(args.model)
    stats = corpus_statistics(
        model, tok, default_cache_dir() / "stats", args.corpus, samples=args.samples
    )
    editor = Editor(model, tok, stats)
    finished = load_previous(out, args.dataset, args.count, args.model)
    for method in methods:
        finished.pop(method, None)
    report: dict[str, Any] = {
        "dataset": args.dataset,
        "split": split,
        "count": args.count,
        "cases": len(cases),
        "model": args.model,
        "protocol": "single (each case edited from the unedited model, scored, rolled back)",
        "statistics": {"corpus": args.corpus or "model-sampled", "samples": args.samples},
        "baseline": None,
        "methods": list(finished.values()),
    }
    if report["methods"]:
        report["baseline"] = report["methods"][0].get("baseline_all_cases")

    def save(current: dict[str, Any] | None = None, quiet: bool = True) -> None:
        done = [*finished.values(), *([current] if current else [])]
        report["methods"] = sorted(done, key=lambda m: _order(m["method"]))
        if report["baseline"] is None and current and current.get("baseline_all_cases"):
            report["baseline"] = current["baseline_all_cases"]
        sink = io.StringIO() if quiet else sys.stdout
        with contextlib.redirect_stdout(sink):
            write_report(report, out)

    where = provenance()
    for method in methods:
        if stop.is_set() or should_stop():
            break
        print(f"{method}: {len(cases)} {args.dataset} cases", file=sys.stderr)
        try:
            result = run_method(
                editor,
                cases,
                method,
                args.checkpoint_every,
                args.fluency,
                should_stop,
                on_progress=save,
            )
        except Exception as exc:  # one method's crash must not lose the others' figures
            result = {"method": method, "completed": False, "error": f"{type(exc).__name__}: {exc}"}
        result["run"] = {k: where[k] for k in ("command", "commit", "uncommitted_changes")}
        finished[method] = result
        save()
        print(_one_line(result), file=sys.stderr)
    save(quiet=False)
    return 0 if all(m.get("completed") for m in report["methods"]) else 1


def _order(method: str) -> tuple[int, str]:
    names = default_methods()
    return (names.index(method) if method in names else len(names), method)


def _deadline(text: str | None) -> datetime.datetime | None:
    if not text:
        return None
    hour, minute = (int(part) for part in text.split(":"))
    now = datetime.datetime.now(datetime.UTC)
    return now.replace(hour=hour, minute=minute, second=0, microsecond=0)


def _one_line(entry: dict[str, Any]) -> str:
    if "error" in entry:
        return f"{entry['method']}: failed: {entry['error']}"
    m = entry.get("metrics") or {}
    shown = ", ".join(f"{k} {v:.3f}" for k, v in m.items() if isinstance(v, float))
    return (
        f"{entry['method']}: {entry['edited']} edited, {entry['refused']} refused, "
        f"{entry['seconds_per_edit']['median']} s/edit (median), "
        f"peak RSS {entry['peak_rss_mb']} MB; {shown}"
    )


# -- the README table -----------------------------------------------------------------------

COLUMNS = (
    ("reliability", "reliability"),
    ("generalization", "generalization"),
    ("locality", "locality"),
    ("portability", "portability"),
    ("efficacy", "efficacy"),
    ("paraphrase", "paraphrase"),
    ("neighborhood", "neighborhood"),
    ("free_rewrite", "free rewrite"),
    ("free_paraphrase", "free paraphrase"),
)


def pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f} %"


def markdown_table(report: dict[str, Any]) -> str:
    """The comparison as a Markdown table: one row per method, the unedited model first;
    s/edit is the median (mean) of the edits' computation alone."""
    head = [
        "method",
        "cases scored",
        *(title for _, title in COLUMNS),
        "free paraphrase, paraphrase prompts (cases)",
        "s/edit median (mean)",
        "peak RSS MB",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    base = report.get("baseline") or {}
    lines.append(
        "| unedited | "
        + str(report.get("cases", "–"))
        + " | "
        + " | ".join(pct(base.get(key)) for key, _ in COLUMNS)
        + " | – | – | – |"
    )
    for entry in report.get("methods", []):
        name = entry["method"]
        if "error" in entry:
            lines.append(f"| {name} | failed: {entry['error']} |" + " |" * (len(head) - 2))
            continue
        m = entry.get("metrics") or {}
        s = entry["seconds_per_edit"]
        edited = f"{entry.get('scored', entry['edited'])}"
        if entry.get("refused"):
            edited += f" ({entry['refused']} refused)"
        if not entry.get("completed"):
            edited += " (cut off)"
        timing = "–" if s["median"] is None else f"{s['median']:.2f} ({s['mean']:.2f})"
        real = (entry.get("free_paraphrase_by_prompt_kind") or {}).get("paraphrase_prompts")
        real_text = "–" if not real else f"{pct(real['free_paraphrase'])} ({real['cases']})"
        lines.append(
            f"| {name} | {edited} | "
            + " | ".join(pct(m.get(key)) for key, _ in COLUMNS)
            + f" | {real_text} | {timing} | {entry['peak_rss_mb']:.0f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
