"""ROME: rank-one model editing (Meng et al., 2022), with the corrected key of R-ROME
(Gupta et al., 2024) as the default.

For one fact at layer l:
  k   = prefix-averaged input of the MLP output projection at the subject's last token
  r   = wanted change of the MLP output there (core.values, in MLP-output space)
  W' = W + r (C^-1 k)^T / (k_d^T C^-1 k)
with k_d = k (variant "corrected") or the bare-prompt key (variant "original"; this mismatch
is what makes original ROME collapse the model on some edits). Several requests are edited
one after another, each on the weights left by the previous one.

The update changes the MLP output at a context whose key is k_j by r (C^-1 k)^T k_j /
(k_d^T C^-1 k): not r itself unless k_j = k_d. With `delivery_aware` (default) r is optimised
as those shares will deliver it at each context, so a target reached in the optimisation is
reached by the edited model (the bare prompt included), not only on average over contexts.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .core.context import edit_context
from .core.keys import Keys, compute_keys, keys_at
from .core.updates import rank_one_update
from .core.values import KL_TEMPLATE, ProgressFn, optimise_residual_targets
from .errors import InvalidValueError
from .hparams import LocateEditHyperParams, check_layers, layer_at
from .model_spec import ModelSpec
from .patch import AppliedPatch, Patch, apply_patch, revert_patch
from .requests import EditRequest
from .result import Diagnostics, EditResult
from .stats import Statistics
from .tokens import locate
from .weights import factored

VARIANTS = ("corrected", "original")


@dataclass(frozen=True)
class ROMEHyperParams(LocateEditHyperParams):
    layer: int | None = None  # None: the family default depth
    layer_fraction: float = 0.17
    variant: str = "corrected"
    delivery_aware: bool = True  # optimise r as the update delivers it at each context

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.variant not in VARIANTS:
            raise InvalidValueError(f"variant must be one of {VARIANTS}", field="variant")

    def edited_layers(self, n_layers: int) -> list[int]:
        return [self.resolved_layer(n_layers)]

    def resolved_layer(self, n_layers: int) -> int:
        layer = self.layer if self.layer is not None else layer_at(self.layer_fraction, n_layers)
        check_layers([layer], n_layers, field="layer")
        return layer


def compute(
    model: PreTrainedModel,
    tok: PreTrainedTokenizerBase,
    requests: list[EditRequest],
    hparams: ROMEHyperParams,
    stats: Statistics,
    *,
    spec: ModelSpec | None = None,
    progress: ProgressFn | None = None,
    prefixes: list[str] | None = None,
) -> EditResult:
    """Edit `requests` one after another; `prefixes` (from an earlier result) skip sampling."""
    started = time.perf_counter()
    context = edit_context(model, tok, hparams, stats, spec, prefixes)
    spec, (layer,), prefixes = context.spec, context.layers, context.prefixes
    diagnostics = Diagnostics(method="rome", layers=[layer], prefixes=prefixes)
    diagnostics.seconds["prepare"] = time.perf_counter() - started
    patch: Patch | None = None
    applied: list[AppliedPatch] = []
    try:
        for index, request in enumerate(requests):

            def step(fraction: float, stage: str, index: int = index) -> None:
                if progress:
                    progress((index + fraction) / len(requests), stage)

            one = _edit_one(
                model, tok, spec, request, prefixes, layer, hparams, stats, diagnostics, step
            )
            if index < len(requests) - 1:
                applied.append(apply_patch(model, one))
            patch = one if patch is None else patch.merged(one)
    finally:
        for record in reversed(applied):
            revert_patch(model, record)
    assert patch is not None
    patch.metadata.update({"layer": str(layer), "variant": hparams.variant})
    diagnostics.delta_norms = patch.delta_norms()
    diagnostics.seconds["total"] = time.perf_counter() - started
    return EditResult(patch, diagnostics)


def _edit_one(
    model: PreTrainedModel,
    tok: PreTrainedTokenizerBase,
    spec: ModelSpec,
    request: EditRequest,
    prefixes: list[str],
    layer: int,
    hparams: ROMEHyperParams,
    stats: Statistics,
    diagnostics: Diagnostics,
    progress: ProgressFn,
) -> Patch:
    t0 = time.perf_counter()
    keys = compute_keys(model, tok, spec, [request], prefixes, [layer])[layer]
    key = keys.mean[0]
    denominator_key = key if hparams.variant == "corrected" else keys.bare[0]
    delivery = None
    if hparams.delivery_aware:
        delivery = _delivered_shares(
            model, tok, spec, request, layer, keys, stats.inverse(layer), denominator_key
        )
    t1 = time.perf_counter()
    targets = optimise_residual_targets(
        model,
        tok,
        spec,
        [request],
        prefixes,
        layer,
        hparams.value_options,
        progress,
        mlp_space=True,
        delivery=delivery,
    )
    t2 = time.perf_counter()
    change = targets.delta[0]  # wanted change of the MLP output at the subject
    left, right = rank_one_update(stats.inverse(layer), key, change, denominator_key)
    diagnostics.steps += targets.steps
    diagnostics.losses.extend(targets.losses)
    diagnostics.prob_before.extend(targets.prob_before)
    diagnostics.prob_after.extend(targets.prob_after)
    for stage, seconds in (
        ("keys", t1 - t0),
        ("values", t2 - t1),
        ("update", time.perf_counter() - t2),
    ):
        diagnostics.seconds[stage] = diagnostics.seconds.get(stage, 0.0) + seconds
    return Patch("rome", {spec.weight_name(layer): factored(spec, left, right)})


def _delivered_shares(
    model: PreTrainedModel,
    tok: PreTrainedTokenizerBase,
    spec: ModelSpec,
    request: EditRequest,
    layer: int,
    keys: Keys,
    c_inv: torch.Tensor,
    denominator_key: torch.Tensor,
) -> torch.Tensor:
    """[1, contexts + 1]: (C^-1 k)^T k_j / (C^-1 k)^T k_d at each context key k_j, the KL
    prompt's last: the share of r the rank-one update makes there."""
    kl_prompt = locate(tok, "", KL_TEMPLATE, request.subject, None)
    kl_key = keys_at(model, tok, spec, [kl_prompt], [layer])[layer]
    every = torch.cat([keys.contexts[0], kl_key]).double()
    u = c_inv.double() @ keys.mean[0].double()
    return ((every @ u) / (denominator_key.double() @ u))[None].float()
