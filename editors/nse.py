"""NSE: neuron-level sequential editing (Jiang et al., 2024, arXiv 2410.04045).

Three changes to MEMIT's recipe, each against a failure of long edit sequences:
  weights rewinding   the target z_i of each request is optimised on the weights before any
                      edit (the history taken back), so targets do not drift with the edits;
                      the residual each layer carries is still measured on the current model.
  neuron selection    at each layer only the MLP neurons S that carry `neuron_share` of the
                      keys' |activation| change:  D[:, S] = R K_S^T (lam C_SS + w K_p,S K_p,S^T
                      + K_S K_S^T)^-1, with K_p the keys of earlier edits (from the history)
                      and w their weight (1 in the paper);
                      the other columns of W stay as they were.
  iterative editing   the layer sweep is repeated for the requests whose top-layer output is
                      still far from z (|z - h| > tolerance |z - h_start|), with neurons
                      selected again from the keys of those requests.

A landing check (ours, off unless `landing_prob` > 0): a target found on the rewound weights
can stop saying the new answer on weights that carry hundreds of edits, though the sweeps
reach it. So the requests whose P(target) on the edited weights is still below
`landing_prob` get a target optimised on the edited weights and sweeps of their own.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .core.context import edit_context
from .core.history import earlier_keys, rewound
from .core.keys import compute_keys
from .core.spread import Factors, Sweeps, sweep_over_layers, top_layer_targets
from .core.updates import least_squares_update, neurons_carrying
from .core.values import ProgressFn, ValueOptions, optimise_residual_targets
from .errors import UnknownHyperparameterError
from .hparams import SequentialHyperParams
from .model_spec import ModelSpec
from .patch import Patch, apply_patch, revert_patch
from .requests import EditRequest
from .result import Diagnostics, EditResult
from .stats import Statistics


@dataclass(frozen=True)
class NSEHyperParams(SequentialHyperParams):
    neuron_share: float = 0.8  # the selected neurons carry this share of |activation|
    iterations: int = 3  # the paper's iterative editing
    rewind: bool = True  # optimise the targets on the weights before the history (the paper)
    # requests whose P(target) on the edited weights (geometric mean over the contexts) is
    # below this get a target on the edited weights and more sweeps; 0: no landing check
    landing_prob: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 < self.neuron_share <= 1:
            raise UnknownHyperparameterError(
                "neuron_share must lie in (0, 1]", field="neuron_share"
            )
        if not 0 <= self.landing_prob < 1:
            raise UnknownHyperparameterError(
                "landing_prob must lie in [0, 1)", field="landing_prob"
            )


def compute(
    model: PreTrainedModel,
    tok: PreTrainedTokenizerBase,
    requests: list[EditRequest],
    hparams: NSEHyperParams,
    stats: Statistics,
    *,
    spec: ModelSpec | None = None,
    progress: ProgressFn | None = None,
    prefixes: list[str] | None = None,
    history: Sequence[Patch] = (),
) -> EditResult:
    """Edit all `requests` at once on top of `history` (the patches applied so far: the
    weights are rewound through them for the targets, and their keys are protected)."""
    started = time.perf_counter()
    context = edit_context(model, tok, hparams, stats, spec, prefixes)
    spec, layers, prefixes = context.spec, context.layers, context.prefixes
    top = layers[-1]
    diagnostics = Diagnostics(method="nse", layers=layers, prefixes=prefixes)

    def report(low: float, high: float) -> ProgressFn:
        def at(fraction: float, stage: str) -> None:
            if progress:
                progress(low + (high - low) * fraction, stage)

        return at

    t0 = time.perf_counter()
    with rewound(model, history if hparams.rewind else ()):
        z, targets = top_layer_targets(
            model, tok, spec, requests, prefixes, top, hparams.value_options, report(0.0, 0.6)
        )
    diagnostics.seconds["values"] = time.perf_counter() - t0
    diagnostics.steps, diagnostics.losses = targets.steps, targets.losses
    diagnostics.prob_before, diagnostics.prob_after = targets.prob_before, targets.prob_after

    earlier: dict[int, torch.Tensor | None] = {}  # K_p K_p^T per layer, the same every sweep
    neurons: dict[str, list[int]] = diagnostics.extra.setdefault("neurons", {})  # per sweep

    def solve(layer: int, keys: torch.Tensor, change: torch.Tensor) -> Factors:
        chosen = neurons_carrying(keys, hparams.neuron_share)
        if layer not in earlier:
            earlier[layer] = earlier_keys(history, layer, hparams.history_weight)
        protected = earlier[layer]
        a, b_chosen = least_squares_update(
            stats.second_moment(layer)[chosen][:, chosen].to(keys.device),
            keys[chosen],
            change,
            hparams.mom2_update_weight,
            None if protected is None else protected[chosen][:, chosen].to(keys.device),
        )
        b = b_chosen.new_zeros((keys.shape[0], b_chosen.shape[1]))
        b[chosen] = b_chosen
        neurons.setdefault(str(layer), []).append(len(chosen))
        return a, b

    t1 = time.perf_counter()
    checking = hparams.landing_prob > 0
    sweeps = Sweeps(hparams.iterations, hparams.tolerance, keys=not checking)
    swept = sweep_over_layers(
        model, tok, spec, requests, prefixes, layers, z, solve, "nse", sweeps,
        report(0.6, 0.8 if checking else 1.0),
    )  # fmt: skip
    patch = swept.patch
    patch.keys = swept.keys
    diagnostics.extra["sweeps"] = swept.sweeps
    diagnostics.extra["target_gap_left"] = swept.left
    diagnostics.seconds["update"] = time.perf_counter() - t1
    if checking:
        t2 = time.perf_counter()
        applied = [apply_patch(model, patch)]
        try:
            look = dataclasses.replace(hparams.value_options, steps=1)
            missed = _not_landed(model, tok, spec, requests, prefixes, top, look, hparams)
            diagnostics.extra["landing_missed"] = missed
            if missed:
                again = [requests[i] for i in missed]
                z_again, _ = top_layer_targets(
                    model, tok, spec, again, prefixes, top, hparams.value_options,
                    report(0.8, 0.9),
                )  # fmt: skip
                retry = Sweeps(hparams.iterations, hparams.tolerance)
                second = sweep_over_layers(
                    model, tok, spec, again, prefixes, layers, z_again, solve, "nse", retry,
                    report(0.9, 1.0),
                ).patch  # fmt: skip
                applied.append(apply_patch(model, second))
                patch = patch.merged(second)
            # the keys the history protects: every request's, on the final edited weights
            found = compute_keys(model, tok, spec, requests, prefixes, layers)
        finally:
            for record in reversed(applied):
                revert_patch(model, record)
        patch.keys = {layer: found[layer].mean.T.float().contiguous() for layer in layers}
        diagnostics.seconds["landing"] = time.perf_counter() - t2
    diagnostics.delta_norms = patch.delta_norms()
    diagnostics.seconds["total"] = time.perf_counter() - started
    return EditResult(patch, diagnostics)


def _not_landed(
    model: PreTrainedModel,
    tok: PreTrainedTokenizerBase,
    spec: ModelSpec,
    requests: list[EditRequest],
    prefixes: list[str],
    top: int,
    look: ValueOptions,
    hparams: NSEHyperParams,
) -> list[int]:
    """Indices of the requests whose P(target) on the current weights (geometric mean over
    their contexts) is below `hparams.landing_prob`: the value optimisation's first look
    (`look` has one step), which scores and does not optimise."""
    probe = optimise_residual_targets(model, tok, spec, requests, prefixes, top, look)
    return [i for i, p in enumerate(probe.prob_before) if p < hparams.landing_prob]
