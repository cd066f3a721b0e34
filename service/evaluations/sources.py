"""Where an evaluation's cases come from: a named benchmark split in the benchmark folder,
or records the caller uploads in one of the benchmark formats.

Requests name datasets, never paths: the files are fixed here, under one folder the
operator configures (EDITSERVE_BENCHMARK_DIR)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from editors.datasets import DatasetError, cases_from_records, load_cases

# dataset -> split -> (file under the benchmark folder, record format)
BENCHMARKS: dict[str, dict[str, tuple[str, str]]] = {
    "counterfact": {
        "train": ("counterfact/counterfact-train.json", "counterfact"),
        "edit": ("counterfact/counterfact-edit.json", "counterfact"),
        "val": ("counterfact/counterfact-val.json", "counterfact"),
    },
    "zsre": {
        "train": ("zsre/zsre-train-1k.json", "zsre"),
        "eval": ("zsre/zsre-eval-portability.json", "zsre"),
    },
    "knowedit-zsre": {"test": ("knowedit/zsre-test-all.json", "knowedit")},
    "knowedit-counterfact": {
        "train": ("knowedit/wiki-counterfact-train.json", "knowedit"),
        "test": ("knowedit/wiki-counterfact-test.jsonl", "knowedit"),
    },
    "knowedit-recent": {"train": ("knowedit/wiki-recent-train.json", "knowedit")},
    "mquake": {"hard": ("mquake/mquake-cf-hard.json", "mquake")},
}

UPLOAD_FORMATS = ("counterfact", "zsre", "knowedit", "mquake")


def default_benchmark_dir() -> Path:
    """The `shared/data` folder beside a source checkout when there is one, else
    ./benchmarks (set EDITSERVE_BENCHMARK_DIR in deployments)."""
    beside_checkout = Path(__file__).resolve().parents[3] / "shared" / "data"
    return beside_checkout if beside_checkout.is_dir() else Path("benchmarks")


def benchmark_file(root: Path, dataset: str, split: str | None) -> tuple[Path, str]:
    """The file and record format of `dataset`/`split` (split defaults to the only one, or
    the one meant for reporting)."""
    splits = BENCHMARKS.get(dataset)
    if splits is None:
        raise DatasetError(
            f"unknown dataset {dataset!r}; known: {sorted(BENCHMARKS)}", field="dataset"
        )
    if split is None:
        split = next((s for s in ("edit", "eval", "test", "hard") if s in splits), None)
        split = split or next(iter(splits))
    if split not in splits:
        raise DatasetError(
            f"dataset {dataset!r} has no split {split!r}; it has {sorted(splits)}", field="split"
        )
    relative, record_format = splits[split]
    path = root / relative
    if not path.is_file():
        raise DatasetError(
            f"the {dataset}/{split} file is not installed in the benchmark folder "
            "(EDITSERVE_BENCHMARK_DIR)",
            field="dataset",
        )
    return path, record_format


def benchmark_cases(
    root: Path, dataset: str, split: str | None, count: int | None, start: int = 0
) -> list[Any]:
    path, record_format = benchmark_file(root, dataset, split)
    problems: list[DatasetError] = []
    cases = load_cases(path, record_format, None, 0, problems)
    # a few real records are malformed (no new answer): skip them, keep the count asked for
    return cases[start : None if count is None else start + count]


def uploaded_cases(records: list[Any], record_format: str | None) -> list[Any]:
    """Cases from uploaded records; errors name `records.<index>` and the field."""
    if record_format is not None and record_format not in UPLOAD_FORMATS:
        raise DatasetError(
            f"unknown format {record_format!r}; known: {list(UPLOAD_FORMATS)}", field="format"
        )
    return cases_from_records(records, record_format, "records")
