"""PMET: precise model editing in a transformer (Li et al., 2024, AAAI).

MEMIT seeks one change of the top edited block's output (the residual stream) and has the
MLPs write all of it, though that state also carries what attention and the residual bring.
PMET seeks two vectors at the subject's last token of the top edited layer L together:

  a_i added to the attention output,  m_i added to the MLP output,
  minimising NLL(target) + kl_factor KL + weight_decay (|a_i| / |a0_i|^2 + |m_i| / |m0_i|^2)
  with |a_i| <= clamp_norm_factor |a0_i| and |m_i| <= clamp_norm_factor |m0_i|

(a0, m0: the clean attention and MLP outputs there), and writes only the MLP's part: the
target is the MLP output z_i = m0_i + m_i, and attention's share is left to attention.
The MLP targets are spread over the edited layers with MEMIT's least squares,
  W_l += R_l K_l^T (lam C_l + K_l K_l^T)^-1,   R_l = (z - m_L(current)) / sqrt(L - l + 1)
where m_L(current) is the top MLP's output on the weights edited so far (core/spread.py with
`mlp_target` and `share_power` 0.5: the square-root spread of the paper's code).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .core.context import edit_context
from .core.spread import Factors, Sweeps, sweep_over_layers
from .core.updates import least_squares_update
from .core.values import ProgressFn, optimise_residual_targets, progress_share
from .errors import InvalidValueError, UnsupportedModelError
from .hparams import SpreadHyperParams
from .model_spec import ModelSpec
from .requests import EditRequest
from .result import Diagnostics, EditResult
from .stats import Statistics

# Each family's attention output projection inside a block: PMET adds a_i to its output.
ATTENTION_OUTPUT = {
    "gpt2": "attn.c_proj",
    "gptj": "attn.out_proj",
    "gpt_neox": "attention.dense",
    "llama": "self_attn.o_proj",
    "mistral": "self_attn.o_proj",
    "qwen2": "self_attn.o_proj",
    "gemma3_text": "self_attn.o_proj",
}


@dataclass(frozen=True)
class PMETHyperParams(SpreadHyperParams):
    # the paper's code for Llama-2-7B: clamp 1 (of each component's own output norm, not
    # the residual's), 20 steps, lam 15000
    steps: int = 20
    clamp_norm_factor: float = 1.0
    mom2_update_weight: float = 15000.0
    attention: bool = True  # optimise a_i with m_i (false: the MLP output alone)
    share_power: float = 0.5  # layer l of the L left takes 1/(L - l)**share_power

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 < self.share_power <= 1:
            raise InvalidValueError("share_power must lie in (0, 1]", field="share_power")


def attention_output_path(spec: ModelSpec, layer: int) -> str:
    try:
        return f"{spec.layer_path(layer)}.{ATTENTION_OUTPUT[spec.family]}"
    except KeyError:
        raise UnsupportedModelError(
            f"pmet does not know where family {spec.family!r} keeps its attention output",
            field="method",
        ) from None


def compute(
    model: PreTrainedModel,
    tok: PreTrainedTokenizerBase,
    requests: list[EditRequest],
    hparams: PMETHyperParams,
    stats: Statistics,
    *,
    spec: ModelSpec | None = None,
    progress: ProgressFn | None = None,
    prefixes: list[str] | None = None,
) -> EditResult:
    """Edit all `requests` at once; `prefixes` (from an earlier result) skip sampling."""
    started = time.perf_counter()
    context = edit_context(model, tok, hparams, stats, spec, prefixes)
    spec, layers, prefixes = context.spec, context.layers, context.prefixes
    top = layers[-1]
    diagnostics = Diagnostics(method="pmet", layers=layers, prefixes=prefixes)
    diagnostics.seconds["prepare"] = time.perf_counter() - started

    t0 = time.perf_counter()
    mlp = spec.mlp_out_path(top)
    components = (attention_output_path(spec, top), mlp) if hparams.attention else (mlp,)
    targets = optimise_residual_targets(
        model,
        tok,
        spec,
        requests,
        prefixes,
        top,
        hparams.value_options,
        progress_share(progress, 0.0, 0.8),
        components=components,
    )
    width = targets.start.shape[1] // len(components)
    z = (targets.start + targets.delta)[:, -width:]  # the MLP's part: m0 + m
    diagnostics.seconds["values"] = time.perf_counter() - t0
    diagnostics.steps, diagnostics.losses = targets.steps, targets.losses
    diagnostics.prob_before, diagnostics.prob_after = targets.prob_before, targets.prob_after
    if hparams.attention:  # |a_i| / |a0_i|: the attention vector sought and not written
        share = targets.delta[:, :width].norm(dim=1) / targets.start[:, :width].norm(dim=1)
        diagnostics.extra["attention_change"] = share.tolist()

    def solve(layer: int, keys: torch.Tensor, change: torch.Tensor) -> Factors:
        second_moment = stats.second_moment(layer).to(keys.device)
        return least_squares_update(second_moment, keys, change, hparams.mom2_update_weight)

    t1 = time.perf_counter()
    sweeps = Sweeps(
        hparams.iterations,
        hparams.tolerance,
        share_cap=hparams.layer_share_cap,
        mlp_target=True,
        share_power=hparams.share_power,
    )
    swept = sweep_over_layers(
        model,
        tok,
        spec,
        requests,
        prefixes,
        layers,
        z,
        solve,
        "pmet",
        sweeps,
        progress_share(progress, 0.8, 1.0),
    )
    patch = swept.patch
    diagnostics.extra["sweeps"] = swept.sweeps
    diagnostics.extra["target_gap_left"] = swept.left
    diagnostics.seconds["update"] = time.perf_counter() - t1
    diagnostics.delta_norms = patch.delta_norms()
    diagnostics.seconds["total"] = time.perf_counter() - started
    return EditResult(patch, diagnostics)
