"""Edit N CounterFact cases on a real model and print JSON figures.

    python bench/bench_edits.py --method rome --cases 100             # each edit alone, reverted
    python bench/bench_edits.py --method memit --cases 100 --batch    # all N as one batch
    python bench/bench_edits.py --method kn --split train --cases 10 --out bench/results/x.json

Timings exclude the one-time statistics and context-prefix sampling. Tune on
--split train; report on --split edit.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time
from pathlib import Path

from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.provenance import write_report
from bench.ready_editor import ready_editor
from editors import apply_patch, revert_patch
from editors.datasets import load_counterfact
from editors.hparams import parse_overrides
from editors.metrics import evaluate, locality_reference

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "counterfact"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--method", default="rome")
    parser.add_argument("--cases", type=int, default=100)
    parser.add_argument("--start", type=int, default=0)
    parser.add_argument("--split", default="edit", choices=["train", "edit", "val"])
    parser.add_argument("--batch", action="store_true", help="all cases as one edit")
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--samples", type=int, default=20_000, help="statistics tokens")
    parser.add_argument(
        "--corpus", help="statistics corpus (`editserve corpus`; default: model-sampled text)"
    )
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE")
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    args = parser.parse_args()
    overrides = parse_overrides(args.set)

    editor, hparams = ready_editor(args.model, args.method, overrides, args.samples, args.corpus)
    model, tok = editor.model, editor.tok
    requests = load_counterfact(DATA / f"counterfact-{args.split}.json", args.cases, args.start)

    reference = locality_reference(model, tok, requests)
    baseline = evaluate(model, tok, requests, reference)
    seconds: list[float] = []
    per_case: list[dict] = []
    stages: dict[str, float | None] = {}  # the batch edit's seconds per stage, and its sweeps
    if args.batch:
        started = time.perf_counter()
        result = editor.compute(requests, args.method, overrides)
        seconds.append(time.perf_counter() - started)
        stages = {**result.diagnostics.seconds, "sweeps": result.diagnostics.extra.get("sweeps")}
        applied = apply_patch(model, result.patch)
        metrics = evaluate(model, tok, requests, reference)
        revert_patch(model, applied)
    else:
        for i, request in enumerate(tqdm(requests, desc=f"{args.method} edits", file=sys.stderr)):
            started = time.perf_counter()
            result = editor.compute([request], args.method, overrides)
            seconds.append(time.perf_counter() - started)
            applied = apply_patch(model, result.patch)
            per_case.append(evaluate(model, tok, [request], [reference[i]]))
            revert_patch(model, applied)
        metrics = {
            k: statistics.mean(c[k] for c in per_case if c[k] is not None)
            for k in per_case[0]
            if any(c[k] is not None for c in per_case)
        }
    report = {
        "method": args.method,
        "model": args.model,
        "split": args.split,
        "start": args.start,
        "cases": len(requests),
        "mode": "batch" if args.batch else "single",
        "hparams": vars(hparams),
        "seconds_per_edit_mean": statistics.mean(seconds) / (len(requests) if args.batch else 1),
        "seconds_per_edit_median": statistics.median(seconds)
        / (len(requests) if args.batch else 1),
        "seconds_total": sum(seconds),
        "batch_stages": stages,
        "statistics": {"corpus": args.corpus or "model-sampled", "samples": args.samples},
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "metrics": metrics,
        "baseline": baseline,
    }
    write_report(report, args.out)


if __name__ == "__main__":
    main()
