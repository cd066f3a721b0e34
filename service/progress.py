"""A tqdm progress bar behind the editors' `progress(fraction, stage)` callbacks."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from tqdm import tqdm


@contextmanager
def progress_bar(description: str) -> Iterator:
    bar = tqdm(
        total=100,
        desc=description,
        unit="%",
        leave=True,
        bar_format="{desc}: {percentage:3.0f}%|{bar}| {postfix}",
    )

    def update(fraction: float, stage: str) -> None:
        bar.n = round(100 * min(max(fraction, 0.0), 1.0))
        bar.set_postfix_str(stage, refresh=False)
        bar.refresh()

    try:
        yield update
    finally:
        bar.close()
