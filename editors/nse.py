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

Targets in the edited context (ours, `edited_context`): rewinding every weight also rewinds
the tokens around the subject, though the edit will be read among their edited states. With
it, only the subject's state is taken on the rewound weights (the anchor z starts from), and
z is sought with the other tokens as the edited weights give them.

A landing check (ours, off unless `landing_prob` > 0): a target found on the rewound weights
can stop saying the new answer on weights that carry hundreds of edits, though the sweeps
reach it. So the requests whose P(target) on the edited weights is still below
`landing_prob` get a target optimised on the edited weights and sweeps of their own.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .core.answers import target_probabilities
from .core.context import edit_context
from .core.history import earlier_keys
from .core.keys import compute_keys
from .core.spread import (
    Factors,
    LayerSolve,
    Sweeps,
    history_targets,
    sweep_over_layers,
    top_layer_targets,
)
from .core.updates import least_squares_update, neurons_carrying
from .core.values import ProgressFn, progress_share
from .errors import InvalidValueError
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
    rewind: bool = True  # the paper's weights rewinding
    # requests whose P(target) on the edited weights (geometric mean over the contexts) is
    # below this get a target on the edited weights and more sweeps; 0: no landing check
    landing_prob: float = 0.0
    # the retargeted requests' targets stop once every context says the target with this
    # probability; 0: the value options' stop_nll
    landing_target_prob: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 < self.neuron_share <= 1:
            raise InvalidValueError("neuron_share must lie in (0, 1]", field="neuron_share")
        if not 0 <= self.landing_prob < 1:
            raise InvalidValueError("landing_prob must lie in [0, 1)", field="landing_prob")
        if self.landing_target_prob and not self.landing_prob < self.landing_target_prob < 1:
            raise InvalidValueError(
                "landing_target_prob must be 0 or lie in (landing_prob, 1)",
                field="landing_target_prob",
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

    t0 = time.perf_counter()
    share = progress_share(progress, 0.0, 0.6)
    z, targets = history_targets(model, tok, spec, requests, prefixes, top, hparams, share, history)
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
    sweeps = Sweeps(hparams.iterations, hparams.tolerance, not checking, hparams.layer_share_cap)
    update_progress = progress_share(progress, 0.6, 0.8 if checking else 1.0)
    swept = sweep_over_layers(
        model, tok, spec, requests, prefixes, layers, z, solve, "nse", sweeps, update_progress
    )
    patch = swept.patch
    patch.keys = swept.keys
    diagnostics.extra["sweeps"] = swept.sweeps
    diagnostics.extra["target_gap_left"] = swept.left
    diagnostics.seconds["update"] = time.perf_counter() - t1
    if checking:
        t2 = time.perf_counter()
        landing = _Landing(model, tok, spec, requests, prefixes, layers, solve, hparams)
        patch, diagnostics.extra["landing_missed"] = landing.land(
            patch, progress_share(progress, 0.8, 1.0)
        )
        diagnostics.seconds["landing"] = time.perf_counter() - t2
    diagnostics.delta_norms = patch.delta_norms()
    diagnostics.seconds["total"] = time.perf_counter() - started
    return EditResult(patch, diagnostics)


@dataclass(frozen=True)
class _Landing:
    """The landing check: on the weights `patch` makes, the requests whose P(target) is
    below `landing_prob` get a target optimised there and sweeps of their own."""

    model: PreTrainedModel
    tok: PreTrainedTokenizerBase
    spec: ModelSpec
    requests: list[EditRequest]
    prefixes: list[str]
    layers: list[int]
    solve: LayerSolve
    hparams: NSEHyperParams

    def land(self, patch: Patch, progress: ProgressFn) -> tuple[Patch, list[int]]:
        """`patch` with the missed requests' second edit merged in, and their indices. The
        patch's keys (what the history protects) are every request's on the final weights;
        the model is left as it was."""
        applied = [apply_patch(self.model, patch)]
        try:
            probs = target_probabilities(self.model, self.tok, self.requests, self.prefixes)
            missed = [i for i, p in enumerate(probs) if p < self.hparams.landing_prob]
            if missed:
                second = self._retarget([self.requests[i] for i in missed], progress)
                applied.append(apply_patch(self.model, second))
                patch = patch.merged(second)
            found = compute_keys(
                self.model, self.tok, self.spec, self.requests, self.prefixes, self.layers
            )
        finally:
            for record in reversed(applied):
                revert_patch(self.model, record)
        patch.keys = {layer: found[layer].mean.T.float().contiguous() for layer in self.layers}
        progress(1.0, "landing check")
        return patch, missed

    def _retarget(self, again: list[EditRequest], progress: ProgressFn) -> Patch:
        hp, model, tok, spec, layers = self.hparams, self.model, self.tok, self.spec, self.layers
        options = hp.value_options
        if hp.landing_target_prob > 0:
            options = dataclasses.replace(options, stop_nll=-math.log(hp.landing_target_prob))
        share = progress_share(progress, 0, 0.5)
        z, _ = top_layer_targets(model, tok, spec, again, self.prefixes, layers[-1], options, share)
        sweeps = Sweeps(hp.iterations, hp.tolerance, share_cap=hp.layer_share_cap)
        return sweep_over_layers(
            model,
            tok,
            spec,
            again,
            self.prefixes,
            layers,
            z,
            self.solve,
            "nse",
            sweeps,
            progress_share(progress, 0.5, 1.0),
        ).patch
