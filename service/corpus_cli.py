"""`editserve corpus`: write a statistics corpus of true facts from benchmark cases
(editors/fact_corpus.py), for `--corpus` or EDITSERVE_STATS_CORPUS."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from editors.errors import EditError
from editors.fact_corpus import write_fact_corpus
from editors.requests import EditRequest

from .evaluations.sources import benchmark_cases


def add_parser(sub: argparse._SubParsersAction) -> None:
    corpus = sub.add_parser(
        "corpus", help="write a statistics corpus of true facts from a benchmark's tuning split"
    )
    corpus.add_argument("--dataset", default="counterfact")
    corpus.add_argument("--split", default="train", help="a tuning split, never a reported one")
    corpus.add_argument("--benchmark-dir", type=Path, help="default: EDITSERVE_BENCHMARK_DIR")
    corpus.add_argument("--out", type=Path, required=True, help="plain-text file to write")
    corpus.set_defaults(func=cmd_corpus)


def cmd_corpus(args: argparse.Namespace) -> int:
    from .config import Settings

    try:
        root = args.benchmark_dir or Settings().benchmark_dir
        cases = benchmark_cases(root, args.dataset, args.split, None)
        if not all(isinstance(case, EditRequest) for case in cases):
            print(f"error: {args.dataset} cases are not single facts", file=sys.stderr)
            return 2
        count = write_fact_corpus(cases, args.out)
    except EditError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"error: cannot write {args.out}: {exc.strerror}", file=sys.stderr)
        return 2
    if count == 0:
        print(f"error: the {args.dataset}/{args.split} cases state no true facts", file=sys.stderr)
        return 2
    print(f"wrote {count} facts to {args.out}")
    return 0
