"""What sequential-editing methods read from the edits already applied (the history: the
patches in effect, oldest first), so that their state is versioned with the weights."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from transformers import PreTrainedModel

from ..patch import Patch, apply_patch, dense_of, revert_patch


def earlier_keys(history: Sequence[Patch], layer: int, weight: float = 1.0) -> torch.Tensor | None:
    """w K_p K_p^T at `layer`: the keys every applied patch in `history` wrote there."""
    blocks = [p.keys[layer].double() for p in history if layer in p.keys]
    if not blocks or weight == 0:
        return None
    keys = torch.cat(blocks, 1)
    return weight * (keys @ keys.T)


@contextmanager
def rewound(model: PreTrainedModel, history: Sequence[Patch]) -> Iterator[None]:
    """The model with every delta of `history` taken back (the weights before those edits),
    put back bit for bit on exit."""
    totals: dict[str, torch.Tensor] = {}
    for patch in history:
        for name, delta in patch.deltas.items():
            change = dense_of(delta)
            totals[name] = totals[name] + change if name in totals else change.clone()
    if not totals:
        yield
        return
    applied = apply_patch(model, Patch("rewind", {name: -total for name, total in totals.items()}))
    try:
        yield
    finally:
        revert_patch(model, applied)
