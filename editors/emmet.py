"""EMMET: equality-constrained mass model editing in a transformer (Gupta et al., 2024,
"A Unified Framework for Model Editing").

ROME and MEMIT both keep the outputs at preserved keys K_0 (second moment C = E[k k^T]) and
write new key-value pairs; ROME writes one fact as an equality constraint, MEMIT a batch as a
least-squares term. EMMET writes the batch as equality constraints:

  min_W'  tr((W' - W) C (W' - W)^T)   subject to   W' K = W K + R

  D = W' - W = R (K^T C^-1 K + lam_e I)^-1 K^T C^-1

with K the requests' prefix-averaged keys (columns) and R the wanted MLP-output changes.
For one request it is ROME's rank-one update (corrected key); lam_e (`emmet_lambda`, 0.1 in
the paper's code) only keeps K^T C^-1 K invertible when two requests' keys nearly coincide.

The targets z_i and their spreading over the edited layers are MEMIT's (core/spread.py):
each layer delivers its share of z - h exactly at the keys, instead of the least-squares
compromise with lam C. EasyEdit multiplies C by `mom2_update_weight` w before inverting;
that scales K^T C^-1 K by 1/w, so here it weighs lam_e: the system is K^T C^-1 K + w lam_e I.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .core.spread import Factors, spread_edit
from .core.updates import equality_constrained_update
from .core.values import ProgressFn
from .errors import InvalidValueError
from .hparams import SpreadHyperParams
from .model_spec import ModelSpec
from .requests import EditRequest
from .result import EditResult
from .stats import Statistics


@dataclass(frozen=True)
class EMMETHyperParams(SpreadHyperParams):
    # C's weight w: only w * emmet_lambda matters (the constraints fix the update's scale);
    # 1 and 0.1 are the paper's code's values for GPT-2 XL and Llama-2-7B
    mom2_update_weight: float = 1.0
    emmet_lambda: float = 0.1  # ridge on K^T C^-1 K (in units of C^-1's key energy)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.emmet_lambda < 0:
            raise InvalidValueError("emmet_lambda must not be negative", field="emmet_lambda")
        if self.mom2_update_weight <= 0:
            raise InvalidValueError(
                "mom2_update_weight must be positive", field="mom2_update_weight"
            )


def compute(
    model: PreTrainedModel,
    tok: PreTrainedTokenizerBase,
    requests: list[EditRequest],
    hparams: EMMETHyperParams,
    stats: Statistics,
    *,
    spec: ModelSpec | None = None,
    progress: ProgressFn | None = None,
    prefixes: list[str] | None = None,
) -> EditResult:
    """Edit all `requests` at once; `prefixes` (from an earlier result) skip sampling."""
    ridge = hparams.mom2_update_weight * hparams.emmet_lambda

    def solve(layer: int, keys: torch.Tensor, change: torch.Tensor) -> Factors:
        second_moment = stats.second_moment(layer).to(keys.device)
        return equality_constrained_update(second_moment, keys, change, ridge)

    return spread_edit(
        model, tok, requests, hparams, stats, solve, "emmet", spec, progress, prefixes
    )
