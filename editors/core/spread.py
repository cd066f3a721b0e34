"""Spreading target residuals over several layers (MEMIT, EMMET, AlphaEdit, NSE, PMET).

With z the wanted output of the top edited block at each subject, for each edited layer l in
ascending order, on the weights already changed below it:
  K = prefix-averaged keys at l (columns)
  R = (z - h_top(current)) / (layers left)      the share of the residual this layer carries
  W_l += A B^T  with (A, B) = solve(l, K, change of the MLP output that yields R)
so the remaining residual is spread over the layers still to be edited. Methods differ only
in `solve`, the closed-form update of one layer.

One sweep rarely lands every request on z: each layer's closed form shrinks its share (the
lam C term), and the layers above see inputs the sweep has changed. So the sweep repeats
(`iterations`) for the requests whose top output is still more than `tolerance` of their
starting distance from z, each sweep on the weights the earlier ones left.

PMET (Li et al., 2024) changes two things (see `Sweeps`): z is the top block's MLP output,
not the block output, so each layer's share is already a change of an MLP output and what a
layer has reached is read at the top MLP; and layer i of the L left takes 1/sqrt(L - i) of
what is left rather than 1/(L - i) (`share_power` 0.5).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..hparams import SpreadHyperParams
from ..model_spec import ModelSpec, edited_weight, get_module
from ..patch import AppliedPatch, Patch, apply_patch, revert_patch
from ..requests import EditRequest
from ..result import Diagnostics, EditResult
from ..stats import Statistics
from ..weights import factored, linear_weight
from .context import edit_context
from .history import rewound
from .keys import compute_keys, residual_at_subject
from .layer_walk import LayerWalk
from .mlp_values import mlp_output_change
from .values import (
    Anchor,
    ProgressFn,
    ResidualTargets,
    ValueOptions,
    clamp_row_norms,
    optimise_residual_targets,
    progress_share,
)

Factors = tuple[torch.Tensor, torch.Tensor]  # A [d_out, r], B [d_in, r]: W += A @ B.T
# (layer, keys [d_in, n], wanted MLP-output changes [d_out, n]) -> the layer's update
LayerSolve = Callable[[int, torch.Tensor, torch.Tensor], Factors]


def spread_edit(
    model: PreTrainedModel,
    tok: PreTrainedTokenizerBase,
    requests: list[EditRequest],
    hparams: SpreadHyperParams,
    stats: Statistics,
    solve: LayerSolve,
    method: str,
    spec: ModelSpec | None = None,
    progress: ProgressFn | None = None,
    prefixes: list[str] | None = None,
    keep_keys: bool = False,
    history: Sequence[Patch] = (),
) -> EditResult:
    """Optimise every request's target residual z at the top edited layer together, then
    spread it over the edited layers with `solve` in up to `hparams.iterations` sweeps;
    with `keep_keys` the patch carries the requests' keys at each edited layer on the edited
    weights (for methods that protect earlier edits). `history`: the patches applied so far,
    for hparams that rewind them (see history_targets)."""
    started = time.perf_counter()
    context = edit_context(model, tok, hparams, stats, spec, prefixes)
    spec, layers, prefixes = context.spec, context.layers, context.prefixes
    top = layers[-1]
    diagnostics = Diagnostics(method=method, layers=layers, prefixes=prefixes)
    t0 = time.perf_counter()
    diagnostics.seconds["prepare"] = t0 - started

    share = progress_share(progress, 0.0, 0.8)
    z, targets = history_targets(model, tok, spec, requests, prefixes, top, hparams, share, history)
    diagnostics.seconds["values"] = time.perf_counter() - t0
    diagnostics.steps = targets.steps
    diagnostics.losses = targets.losses
    diagnostics.prob_before, diagnostics.prob_after = targets.prob_before, targets.prob_after

    t1 = time.perf_counter()
    swept = sweep_over_layers(
        model,
        tok,
        spec,
        requests,
        prefixes,
        layers,
        z,
        solve,
        method,
        Sweeps(hparams.iterations, hparams.tolerance, keep_keys, hparams.layer_share_cap),
        progress_share(progress, 0.8, 1.0),
    )
    patch = swept.patch
    if keep_keys:
        patch.keys = swept.keys
    diagnostics.extra["sweeps"] = swept.sweeps
    diagnostics.extra["target_gap_left"] = swept.left
    diagnostics.seconds["update"] = time.perf_counter() - t1
    diagnostics.delta_norms = patch.delta_norms()
    diagnostics.seconds["total"] = time.perf_counter() - started
    return EditResult(patch, diagnostics)


def history_targets(
    model: PreTrainedModel,
    tok: PreTrainedTokenizerBase,
    spec: ModelSpec,
    requests: list[EditRequest],
    prefixes: list[str],
    top: int,
    hparams: SpreadHyperParams,
    progress: ProgressFn,
    history: Sequence[Patch],
) -> tuple[torch.Tensor, ResidualTargets]:
    """top_layer_targets on the weights `hparams.target_source` names (`history`: the patches
    that rewinding takes back)."""
    source = hparams.target_source
    back = history if source.rewind else ()
    weights: AbstractContextManager[object]
    anchor: Anchor | None
    if source.edited_context:
        weights, anchor = contextlib.nullcontext(), lambda: rewound(model, back)
    else:
        weights, anchor = rewound(model, back), None
    with weights:
        return top_layer_targets(
            model, tok, spec, requests, prefixes, top, hparams.value_options, progress, anchor
        )


def top_layer_targets(
    model: PreTrainedModel,
    tok: PreTrainedTokenizerBase,
    spec: ModelSpec,
    requests: list[EditRequest],
    prefixes: list[str],
    top: int,
    options: ValueOptions,
    progress: ProgressFn | None = None,
    anchor: Anchor | None = None,
) -> tuple[torch.Tensor, ResidualTargets]:
    """z [n, d], the wanted output of block `top` at each request's subject (bare prompt),
    and the optimisation that found it.

    Where the family normalises the MLP output before the residual (Gemma 3), a residual
    change sought freely is mostly out of reach of the MLP weights (the norm fixes the
    output's scale, far below the residual's), and the layers' updates then move the
    residual anywhere but to z. There the change is sought in the top MLP's output space,
    as ROME does, and z is the residual that change makes: reachable by the top layer
    alone, so the layers below take shares of a change the weights can make.

    `anchor`: see optimise_residual_targets."""
    post_norm = spec.mlp_post_norm is not None
    targets = optimise_residual_targets(
        model, tok, spec, requests, prefixes, top, options, progress, post_norm, anchor=anchor
    )
    delta = targets.delta.detach()
    if not post_norm:
        return targets.start + delta, targets
    norm = get_module(model, f"{spec.layer_path(top)}.{spec.mlp_post_norm}")
    with torch.no_grad():
        dtype = norm.weight.dtype
        made = norm((targets.start + delta).to(dtype)) - norm(targets.start.to(dtype))
    start = residual_at_subject(model, tok, spec, requests, top)
    if targets.offset is not None:
        start = start + targets.offset
    return start + made.float(), targets


@dataclass(frozen=True)
class Sweeps:
    iterations: int  # most sweeps
    tolerance: float  # a request is done when |z - h| <= tolerance * |z - h before the edit|
    keys: bool = False  # also return the requests' keys on the edited weights
    share_cap: float = 0.0  # see SpreadHyperParams.layer_share_cap; 0: off
    # z is the top block's MLP output (PMET), each share a change of an MLP output
    mlp_target: bool = False
    # layer i of the L left takes 1/(L - i)**share_power of what is left (PMET: 0.5)
    share_power: float = 1.0


@dataclass
class SweepResult:
    patch: Patch
    sweeps: int  # sweeps made
    left: list[float]  # per request, |z - h| on the edited weights over |z - h| before
    keys: dict[int, torch.Tensor]  # with Sweeps.keys: keys [d_in, n] on the edited weights


def sweep_over_layers(
    model: PreTrainedModel,
    tok: PreTrainedTokenizerBase,
    spec: ModelSpec,
    requests: list[EditRequest],
    prefixes: list[str],
    layers: list[int],
    z: torch.Tensor,
    solve: LayerSolve,
    method: str,
    sweeps: Sweeps,
    progress: ProgressFn | None = None,
) -> SweepResult:
    """Up to `sweeps.iterations` spreads, the first for every request, each later one for
    the requests still far from z; the model is left as it was."""
    top = layers[-1]
    patch = Patch(method, {}, {"layers": ",".join(map(str, layers))})
    applied: list[AppliedPatch] = []
    keys: dict[int, torch.Tensor] = {}
    measured = spec.mlp_out_path(top) if sweeps.mlp_target else None
    try:
        # the top output measured after each sweep is the next sweep's first residual
        top_output = residual_at_subject(model, tok, spec, requests, top, measured)
        start_gap = gap = (z - top_output).norm(dim=1)
        open_ = list(range(len(requests)))  # the first sweep carries every request
        for sweep in range(sweeps.iterations):
            if not open_:
                break

            def report(fraction: float, stage: str, sweep: int = sweep) -> None:
                if progress:
                    progress((sweep + fraction) / sweeps.iterations, f"sweep {sweep + 1}: {stage}")

            part = _spread_once(
                model,
                tok,
                spec,
                [requests[i] for i in open_],
                prefixes,
                layers,
                z[open_],
                top_output[open_],
                solve,
                method,
                sweeps,
                report,
            )
            applied.append(apply_patch(model, part))
            patch = patch.merged(part)
            top_output = residual_at_subject(model, tok, spec, requests, top, measured)
            gap = (z - top_output).norm(dim=1)
            open_ = torch.nonzero(gap > sweeps.tolerance * start_gap).squeeze(1).tolist()
        left = (gap / start_gap.clamp_min(1e-12)).tolist()
        if sweeps.keys:
            found = compute_keys(model, tok, spec, requests, prefixes, layers)
            keys = {layer: found[layer].mean.T.float().contiguous() for layer in layers}
    finally:
        for record in reversed(applied):
            revert_patch(model, record)
    if progress:
        progress(1.0, "update done")
    return SweepResult(patch, len(applied), left, keys)


def _spread_once(
    model: PreTrainedModel,
    tok: PreTrainedTokenizerBase,
    spec: ModelSpec,
    requests: list[EditRequest],
    prefixes: list[str],
    layers: list[int],
    z: torch.Tensor,
    top_output: torch.Tensor,
    solve: LayerSolve,
    method: str,
    sweeps: Sweeps,
    progress: ProgressFn | None = None,
) -> Patch:
    """One sweep: the patch over `layers`; the model is left as it was. `top_output` is the
    top block's output (its MLP's with `sweeps.mlp_target`) at the subjects on the current
    weights (measured by the caller). With `sweeps.share_cap` > 0 each layer's residual is
    cut to at most share_cap |z - top_output| / len(layers) per request."""
    top = layers[-1]
    patch = Patch(method, {}, {"layers": ",".join(map(str, layers))})
    applied: list[AppliedPatch] = []
    walk = LayerWalk(model, tok, spec, requests, prefixes)
    share_cap, power = sweeps.share_cap, sweeps.share_power
    share_limit = share_cap * (z - top_output).norm(dim=1) / len(layers)
    measured = spec.mlp_out_path(top) if sweeps.mlp_target else None
    try:
        for i, layer in enumerate(layers):
            keys = walk.keys(layer)
            # below the first edit the top output is the caller's; above, the walk's
            reached = top_output if i == 0 else walk.block_output(top, measured)
            left = len(layers) - i
            residual = (z - reached) / (left if power == 1 else left**power)
            if share_cap > 0:
                residual = clamp_row_norms(residual, share_limit)
            if sweeps.mlp_target:  # the share is a change of the MLP output already
                change = residual
            else:
                weight = linear_weight(spec, edited_weight(model, spec, layer)).float()
                change = mlp_output_change(model, spec, layer, keys @ weight.T, residual)
            a, b = solve(layer, keys.T, change.T)
            part = Patch(method, {spec.weight_name(layer): factored(spec, a, b)})
            applied.append(apply_patch(model, part))
            patch = patch.merged(part)
            if layer != top:
                walk.advance(layer)
            if progress:
                progress((i + 1) / len(layers), f"update layer {layer}")
    finally:
        for record in reversed(applied):
            revert_patch(model, record)
    return patch
