"""MEMIT: mass-editing memory in a transformer (Meng et al., 2023).

All requests' target residuals z_i are optimised together at the last edited layer L. Then,
for each edited layer l in ascending order, on the weights already changed below it:
  K   = prefix-averaged keys at l (columns),  R = (z - h_L(current)) / (layers left)
  W' = W + R K^T (lam C + K K^T)^-1
so the remaining residual is spread over the layers that are still to be edited.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .core.context import edit_context
from .core.keys import compute_keys, residual_at_subject
from .core.mlp_values import mlp_output_change
from .core.updates import least_squares_update
from .core.values import ProgressFn, optimise_residual_targets
from .errors import UnknownHyperparameterError
from .hparams import LocateEditHyperParams, check_layers, layer_at
from .model_spec import ModelSpec, edited_weight
from .patch import AppliedPatch, Patch, apply_patch, revert_patch
from .requests import EditRequest
from .result import Diagnostics, EditResult
from .stats import Statistics
from .weights import factored, linear_weight


@dataclass(frozen=True)
class MEMITHyperParams(LocateEditHyperParams):
    layers: tuple[int, ...] | None = None  # None: `span` layers ending at the default depth
    last_layer_fraction: float = 0.23
    span: int = 5
    mom2_update_weight: float = 1000.0  # lam: how strongly C protects other keys

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.mom2_update_weight < 0:
            raise UnknownHyperparameterError(
                "mom2_update_weight must not be negative", field="mom2_update_weight"
            )
        if self.layers is not None and (
            not self.layers or list(self.layers) != sorted(set(self.layers))
        ):
            raise UnknownHyperparameterError(
                "layers must be distinct and ascending", field="layers"
            )

    def edited_layers(self, n_layers: int) -> list[int]:
        return self.resolved_layers(n_layers)

    def resolved_layers(self, n_layers: int) -> list[int]:
        if self.layers is not None:
            layers = list(self.layers)
        else:
            last = layer_at(self.last_layer_fraction, n_layers)
            layers = list(range(max(0, last - self.span + 1), last + 1))
        check_layers(layers, n_layers)
        return layers


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
    started = time.perf_counter()
    context = edit_context(model, tok, hparams, stats, spec, prefixes)
    spec, layers, prefixes = context.spec, context.layers, context.prefixes
    top = layers[-1]
    diagnostics = Diagnostics(method="memit", layers=layers, prefixes=prefixes)
    t0 = time.perf_counter()
    diagnostics.seconds["prepare"] = t0 - started

    def value_progress(fraction: float, stage: str) -> None:
        if progress:
            progress(0.8 * fraction, stage)

    targets = optimise_residual_targets(
        model, tok, spec, requests, prefixes, top, hparams.value_options, value_progress
    )
    z = targets.start + targets.delta  # wanted output of block `top` at each subject
    diagnostics.seconds["values"] = time.perf_counter() - t0
    diagnostics.steps = targets.steps
    diagnostics.losses = targets.losses
    diagnostics.prob_before, diagnostics.prob_after = targets.prob_before, targets.prob_after

    t1 = time.perf_counter()
    patch = Patch("memit", {}, {"layers": ",".join(map(str, layers))})
    applied: list[AppliedPatch] = []
    try:
        for i, layer in enumerate(layers):
            keys = compute_keys(model, tok, spec, requests, prefixes, [layer])[layer].mean
            residual = (z - residual_at_subject(model, tok, spec, requests, top)) / (
                len(layers) - i
            )
            weight = linear_weight(spec, edited_weight(model, spec, layer)).float()
            change = mlp_output_change(model, spec, layer, keys @ weight.T, residual)
            a, b = least_squares_update(
                stats.second_moment(layer), keys.T, change.T, hparams.mom2_update_weight
            )
            part = Patch("memit", {spec.weight_name(layer): factored(spec, a, b)})
            applied.append(apply_patch(model, part))
            patch = patch.merged(part)
            if progress:
                progress(0.8 + 0.2 * (i + 1) / len(layers), f"update layer {layer}")
    finally:
        for record in reversed(applied):
            revert_patch(model, record)
    diagnostics.seconds["update"] = time.perf_counter() - t1
    diagnostics.delta_norms = patch.delta_norms()
    diagnostics.seconds["total"] = time.perf_counter() - started
    return EditResult(patch, diagnostics)
