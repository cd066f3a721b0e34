"""MEMIT: mass-editing memory in a transformer (Meng et al., 2023).

All requests' target residuals z_i are optimised together at the last edited layer L, then
spread over the edited layers (core/spread.py), each layer solving
  W' = W + R K^T (lam C + K K^T)^-1
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .core.spread import Factors, spread_edit
from .core.updates import least_squares_update
from .core.values import ProgressFn
from .hparams import SpreadHyperParams
from .model_spec import ModelSpec
from .requests import EditRequest
from .result import EditResult
from .stats import Statistics


@dataclass(frozen=True)
class MEMITHyperParams(SpreadHyperParams):
    """MEMIT's fields are the spread methods' own (`mom2_update_weight` is its lam)."""


def compute(
    model: PreTrainedModel,
    tok: PreTrainedTokenizerBase,
    requests: list[EditRequest],
    hparams: MEMITHyperParams,
    stats: Statistics,
    *,
    spec: ModelSpec | None = None,
    progress: ProgressFn | None = None,
    prefixes: list[str] | None = None,
) -> EditResult:
    """Edit all `requests` at once; `prefixes` (from an earlier result) skip sampling."""

    def solve(layer: int, keys: torch.Tensor, change: torch.Tensor) -> Factors:
        return least_squares_update(
            stats.second_moment(layer), keys, change, hparams.mom2_update_weight
        )

    return spread_edit(
        model, tok, requests, hparams, stats, solve, "memit", spec, progress, prefixes
    )
