"""`editserve eval`: an evaluation run on this machine, without the server, writing the
summary JSON, the rows as CSV and the HTML report."""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from pathlib import Path
from typing import TextIO

from tqdm import tqdm

from editors.datasets import DatasetError, read_records
from editors.errors import EditError
from editors.evaluation.plan import EvaluationRow
from editors.hparams import parse_overrides

from .sources import BENCHMARKS, UPLOAD_FORMATS, benchmark_cases, uploaded_cases

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def add_parser(sub: argparse._SubParsersAction) -> None:
    ev = sub.add_parser(
        "eval", help="evaluate a method on a benchmark (single, batch or sequential protocol)"
    )
    source = ev.add_mutually_exclusive_group()
    source.add_argument("--dataset", choices=sorted(BENCHMARKS), default="counterfact")
    source.add_argument("--file", type=Path, help="your own cases (JSON or JSON lines)")
    ev.add_argument("--split", help="benchmark split (default: the one meant for reporting)")
    ev.add_argument("--format", choices=UPLOAD_FORMATS, help="--file's format (default: detect)")
    ev.add_argument("-n", "--count", type=int, default=100, help="number of cases")
    ev.add_argument("--start", type=int, default=0, help="index of the first case")
    ev.add_argument("--method", default="rome")
    ev.add_argument(
        "--protocol", choices=["none", "single", "batch", "sequential"], default="single"
    )
    ev.add_argument("--batch-size", type=int, help="cases per edit (default 1; batch: all)")
    ev.add_argument("--checkpoint-every", type=int, help="edits between sequential checkpoints")
    ev.add_argument("--set", action="append", default=[], metavar="NAME=VALUE")
    ev.add_argument("--no-fluency", action="store_true", help="skip the generation probe")
    ev.add_argument("--model", default="smollm2-135m-instruct")
    ev.add_argument("--benchmark-dir", type=Path, help="default: EDITSERVE_BENCHMARK_DIR")
    ev.add_argument("--corpus", help="statistics corpus (default: model-sampled text)")
    ev.add_argument("--samples", type=int, default=20_000)
    ev.add_argument("--cache-dir", help="models and statistics cache (~/.cache/editserve)")
    ev.add_argument("--out", type=Path, help="output folder (default: evaluations/<run name>)")
    ev.set_defaults(func=cmd_eval)


def _cases(args: argparse.Namespace) -> list:
    from ..config import Settings

    if args.file is not None:
        records = read_records(args.file)[args.start : args.start + args.count]
        return uploaded_cases(records, args.format)
    root = args.benchmark_dir or Settings().benchmark_dir
    return benchmark_cases(root, args.dataset, args.split, args.count, args.start)


def cmd_eval(args: argparse.Namespace) -> int:
    from editors.editor import Editor, corpus_statistics
    from editors.evaluation import EvaluationPlan, run_evaluation
    from editors.models import default_cache_dir, load_model

    from ..progress import progress_bar
    from .report import to_csv, to_html

    try:
        cases = _cases(args)
        plan = EvaluationPlan(
            method=args.method,
            protocol=args.protocol,
            batch_size=args.batch_size,
            checkpoint_every=args.checkpoint_every,
            hparams=parse_overrides(args.set),
            fluency=not args.no_fluency,
        )
        if not cases:
            raise DatasetError("no cases in the range asked for", field="count")
    except EditError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    source = args.file.stem if args.file else f"{args.dataset}-{args.split or 'default'}"
    name = f"{source}-{args.method}-{args.protocol}-{len(cases)}"
    out = args.out or Path("evaluations") / name
    cache = Path(args.cache_dir) if args.cache_dir else None
    model, tok = load_model(args.model, cache)
    with progress_bar("statistics") as bar:
        stats = corpus_statistics(
            model,
            tok,
            (cache or default_cache_dir()) / "stats",
            args.corpus,
            args.samples,
            progress=bar,
        )
        editor = Editor(model, tok, stats)
        try:
            editor.hparams(plan.method, plan.hparams)  # bad names fail here, before the run
            if plan.protocol != "none":  # computed here, under this bar, not mid-run
                stats.prepare(editor.statistics_layers(plan.method, plan.hparams))
        except EditError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    stop = threading.Event()  # Ctrl-C or SIGTERM: finish the current edit, keep the results
    handlers = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in STOP_SIGNALS}
    out.mkdir(parents=True, exist_ok=True)
    try:
        with (
            progress_bar(f"{plan.protocol} {plan.method} on {len(cases)} cases") as bar,
            (out / "rows.jsonl").open("w", encoding="utf-8") as stream,
        ):
            summary, rows = run_evaluation(
                editor,
                cases,
                plan,
                record=lambda row: _stream_row(stream, row),
                progress=bar,
                should_stop=stop.is_set,
            )
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    summary.update(model=args.model, source=source)
    result = {"summary": summary, "rows": [r.to_dict() for r in rows]}
    (out / "results.json").write_text(json.dumps(result, indent=1), encoding="utf-8")
    (out / "results.csv").write_text(to_csv(rows), encoding="utf-8")
    (out / "report.html").write_text(to_html(name, summary, rows), encoding="utf-8")
    print(json.dumps(summary, indent=2))
    print(f"wrote {out}/results.json, results.csv and report.html", file=sys.stderr)
    return 0 if summary["completed"] else 1


def _stream_row(stream: TextIO, row: EvaluationRow) -> None:
    """Each row as it is measured, to `rows.jsonl` (a long run can be followed, and what it
    measured survives a crash); aggregate rows also as one line on the terminal."""
    stream.write(json.dumps(row.to_dict()) + "\n")
    stream.flush()
    if row.kind != "case":
        shown = ", ".join(
            f"{name} {value:.3g}" for name, value in row.metrics.items() if value is not None
        )
        tqdm.write(f"{row.kind} after {row.edits_done} edits: {shown}", file=sys.stderr)
