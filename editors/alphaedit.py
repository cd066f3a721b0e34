"""AlphaEdit: null-space constrained knowledge editing (Fang et al., 2025).

MEMIT's targets and layer spreading (core/spread.py), with each layer's update projected on
the null space of the preserved keys' second moment C:
  D = R K^T P (w K_p K_p^T P + K K^T P + l2 I)^-1,   P = projection on {v : C v ~ 0}
(optionally with lam_c C beside K K^T, for models whose C has no exact null space)
so the outputs at preserved keys cannot move (D k0 = 0), and the keys of earlier edits K_p
(read from the patches already applied: the method's state is the edit history, so a
rollback restores it with the weights) are kept almost unchanged. That is what lets it take
thousands of sequential edits where MEMIT degrades. The history weight w (1 in the paper)
sets how firmly those earlier keys are held. `rewind` and `edited_context` (off by default;
see SequentialHyperParams) seek the targets as NSE does, from the weights before the history.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .core.history import earlier_keys
from .core.spread import Factors, spread_edit
from .core.updates import null_space_projection, null_space_update
from .core.values import ProgressFn
from .errors import InvalidValueError
from .hparams import SequentialHyperParams
from .model_spec import ModelSpec
from .patch import Patch
from .requests import EditRequest
from .result import EditResult
from .stats import Statistics


@dataclass(frozen=True)
class AlphaEditHyperParams(SequentialHyperParams):
    # Both are scale-free. A null space holding 1 % of C filled up with the history's keys
    # and collapsed before 200 sequential edits on SmolLM2; the Llama family takes 0.5 with
    # lam_c 100, since 0.1 spans fewer dimensions than 500 edits' keys there
    # (docs/lifelong-editing.md). Without lam_c a larger share takes in outlier directions.
    nullspace_energy: float = 0.1  # P spans C's weakest directions holding this share of it
    l2: float = 10.0  # ridge term, in units of C's mean eigenvalue (a key's energy per dim)
    # lam_c: here lam C counts only through C's energy left inside the null space (P C P);
    # 0 is the paper's hard projection alone
    mom2_update_weight: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 < self.nullspace_energy < 1:
            raise InvalidValueError("nullspace_energy must lie in (0, 1)", field="nullspace_energy")
        if self.l2 <= 0:
            raise InvalidValueError("l2 must be positive", field="l2")


# P per (statistics object, layer, energy): an eigendecomposition of d_in x d_in, reused
_projections: weakref.WeakKeyDictionary[object, dict[tuple[int, float], torch.Tensor]] = (
    weakref.WeakKeyDictionary()
)


def projection(stats: Statistics, layer: int, energy: float) -> torch.Tensor:
    memo = _projections.setdefault(stats, {})
    if (layer, energy) not in memo:
        memo[(layer, energy)] = null_space_projection(stats.second_moment(layer), energy)
    return memo[(layer, energy)]


def compute(
    model: PreTrainedModel,
    tok: PreTrainedTokenizerBase,
    requests: list[EditRequest],
    hparams: AlphaEditHyperParams,
    stats: Statistics,
    *,
    spec: ModelSpec | None = None,
    progress: ProgressFn | None = None,
    prefixes: list[str] | None = None,
    history: Sequence[Patch] = (),
) -> EditResult:
    """Edit all `requests` at once on top of `history` (the patches applied so far, whose
    keys the update leaves alone)."""

    def solve(layer: int, keys: torch.Tensor, change: torch.Tensor) -> Factors:
        p = projection(stats, layer, hparams.nullspace_energy).to(keys.device)
        earlier = earlier_keys(history, layer, hparams.history_weight)
        second_moment = stats.second_moment(layer)
        scale = float(torch.trace(second_moment.double())) / keys.shape[0]
        weight = hparams.mom2_update_weight
        return null_space_update(
            p,
            keys,
            change,
            None if earlier is None else earlier.to(keys.device),
            hparams.l2 * scale,
            weight * second_moment.to(keys.device) if weight else None,
        )

    return spread_edit(
        model,
        tok,
        requests,
        hparams,
        stats,
        solve,
        "alphaedit",
        spec,
        progress,
        prefixes,
        keep_keys=True,
        history=history,
    )
