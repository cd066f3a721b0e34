"""Constrained fine-tuning baselines (EasyEdit's FT-L and FT-M).

Gradient steps on the chosen layers' MLP output matrices only. The two variants differ in
the loss and the constraint:
  FT-L  cross-entropy of the first target token after the prompt; every step is followed by
        a projection back into the box |W - W0|_inf <= norm_constraint (Zhu et al., 2020)
  FT-M  cross-entropy of every target token (masked: the prompt tokens carry no loss);
        unbounded unless norm_constraint is set
The result is a dense delta per matrix (W - W0), a patch like any other.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Literal

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .core.answers import answer_batch
from .core.values import ProgressFn
from .errors import InvalidValueError
from .hparams import check_layers, layer_at
from .model_spec import ModelSpec, detect_spec, edited_weight, num_layers
from .patch import Patch
from .requests import EditRequest
from .result import Diagnostics, EditResult
from .stats import Statistics


@dataclass(frozen=True)
class FTHyperParams:
    objective: Literal["first_token", "all_tokens"] = "all_tokens"
    layers: tuple[int, ...] | None = None  # None: one layer at `layer_fraction`
    layer_fraction: float = 0.2
    steps: int = 25
    lr: float = 5e-4
    norm_constraint: float | None = None  # the largest change of any weight (None: no box)
    stop_nll: float = 0.05
    prefixes: int = 0  # no sampled contexts: fine-tuning sees the bare prompts
    prefix_length: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        if self.objective not in ("first_token", "all_tokens"):
            raise InvalidValueError(
                "objective must be first_token or all_tokens", field="objective"
            )
        for name in ("steps", "lr", "norm_constraint", "stop_nll"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise InvalidValueError(f"{name} must be positive", field=name)

    def edited_layers(self, n_layers: int) -> list[int]:
        layers = list(self.layers) if self.layers else [layer_at(self.layer_fraction, n_layers)]
        check_layers(layers, n_layers)
        return layers


@dataclass(frozen=True)
class FTLHyperParams(FTHyperParams):
    objective: Literal["first_token", "all_tokens"] = "first_token"
    norm_constraint: float | None = 5e-4


@dataclass(frozen=True)
class FTMHyperParams(FTHyperParams):
    objective: Literal["first_token", "all_tokens"] = "all_tokens"


def compute(
    model: PreTrainedModel,
    tok: PreTrainedTokenizerBase,
    requests: list[EditRequest],
    hparams: FTHyperParams,
    stats: Statistics,
    *,
    spec: ModelSpec | None = None,
    progress: ProgressFn | None = None,
    prefixes: list[str] | None = None,
) -> EditResult:
    """Fine-tune on all `requests` together; the model is restored exactly afterwards."""
    started = time.perf_counter()
    spec = detect_spec(model, spec)
    layers = hparams.edited_layers(num_layers(model, spec))
    weights = {layer: edited_weight(model, spec, layer) for layer in layers}
    originals = {layer: w.detach().clone() for layer, w in weights.items()}
    device = next(model.parameters()).device
    batch = answer_batch(tok, requests, device, hparams.objective == "first_token")
    ids, mask, target = batch.ids, batch.mask, batch.labels
    name = "ft-l" if hparams.objective == "first_token" else "ft-m"
    diagnostics = Diagnostics(method=name, layers=layers, prefixes=[""])
    optimiser = torch.optim.Adam(list(weights.values()), lr=hparams.lr)
    for w in weights.values():
        w.requires_grad_(True)
    try:
        for step in range(hparams.steps):
            logits = model(input_ids=ids, attention_mask=mask).logits.float()
            loss = torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]), target[:, 1:].reshape(-1)
            )
            diagnostics.losses.append(float(loss.detach()))
            if step == 0:
                diagnostics.prob_before = [float(torch.exp(-loss.detach()))] * len(requests)
            if float(loss.detach()) < hparams.stop_nll:
                break
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            bound = hparams.norm_constraint
            if bound is not None:
                with torch.no_grad():  # back into the box around the original weights
                    for layer, w in weights.items():
                        w.copy_(torch.clamp(w, originals[layer] - bound, originals[layer] + bound))
            diagnostics.steps = step + 1
            if progress:
                progress((step + 1) / hparams.steps, "fine-tune")
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask).logits.float()
            final = torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]), target[:, 1:].reshape(-1)
            )
        # exp(-mean target-token NLL) of the whole batch, before and after
        diagnostics.prob_after = [float(torch.exp(-final))] * len(requests)
        deltas = {
            spec.weight_name(layer): (w.detach().float() - originals[layer].float()).contiguous()
            for layer, w in weights.items()
        }
    finally:
        with torch.no_grad():
            for layer, w in weights.items():
                w.requires_grad_(False)
                w.copy_(originals[layer])
    patch = Patch(name, deltas, {"objective": hparams.objective})
    diagnostics.delta_norms = patch.delta_norms()
    diagnostics.seconds["total"] = time.perf_counter() - started
    return EditResult(patch, diagnostics)
