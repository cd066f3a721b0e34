"""What sequential-editing methods read from the edits already applied (the history: the
patches in effect, oldest first), so that their state is versioned with the weights."""

from __future__ import annotations

import weakref
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel

from ..patch import Patch, apply_patch, dense_of, revert_patch


@dataclass(frozen=True)
class _RunningGram:
    """K_p K_p^T at one layer over `patches` (held weakly, compared by identity)."""

    patches: tuple[weakref.ref[Patch], ...]
    gram: torch.Tensor


# The last history's Gram per layer. Sequential editing asks for the same history plus the
# newest edit each time, so extending the sum costs one edit's keys instead of the whole
# history's (about a second per layer at 500 edits on SmolLM2). It holds one d_in x d_in
# float64 matrix per edited layer, as AlphaEdit's memoised projections do. An entry is
# replaced whole, never changed in place (one dict store), so a concurrent reader sees the
# old sum or the new one; patches are never changed once made, so identity is enough.
_running: dict[int, _RunningGram] = {}


def earlier_keys(history: Sequence[Patch], layer: int, weight: float = 1.0) -> torch.Tensor | None:
    """w K_p K_p^T at `layer`: the keys every applied patch in `history` wrote there."""
    writers = [p for p in history if layer in p.keys]
    if not writers or weight == 0:
        return None
    cached = _running.get(layer)
    if cached is not None and _extends(writers, cached.patches):
        done = len(cached.patches)
        if done == len(writers):
            return weight * cached.gram
        total = cached.gram.clone()
    else:
        done, size = 0, writers[0].keys[layer].shape[0]
        total = torch.zeros(size, size, dtype=torch.float64, device=writers[0].keys[layer].device)
    # one patch at a time on every path, so the sum is the same bits cached or not
    for patch in writers[done:]:
        keys = patch.keys[layer].double()
        total.addmm_(keys, keys.T)
    _running[layer] = _RunningGram(tuple(weakref.ref(p) for p in writers), total)
    return weight * total


def _extends(history: Sequence[Patch], prefix: Sequence[weakref.ref[Patch]]) -> bool:
    return len(prefix) <= len(history) and all(
        ref() is patch for ref, patch in zip(prefix, history, strict=False)
    )


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
