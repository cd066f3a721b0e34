"""CaliNet: calibrating factual knowledge with FFN-like memory slots (Dong et al., 2022).

No weight changes. An edit adds `slots` calibration memory slots beside one layer's MLP
(editors/neurons.py), an FFN of its own whose output is added to the MLP's:

    FFN'(x) = FFN(x) + act(x K_c^T) V_c        (K_c, V_c [slots, d_model]; no bias)

with the family's activation. The slots are trained on the edits with the base model
frozen: the NLL of each target after its prompt, in every sampled context (prefix +
prompt, so the calibration holds whatever precedes it), plus, as in EasyEdit-style
locality, `locality_weight` times KL(base || calibrated) of the next-token distributions
at every position of some neutral text. Keys start from a seeded Gaussian scaled to unit
pre-activations on the edits' MLP inputs, values at zero (training starts from the
unchanged model). Later edits add further slots; the earlier ones stay as they are.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .core.answers import answer_batch
from .core.values import ProgressFn
from .errors import InvalidValueError
from .hparams import check_layers
from .model_spec import ModelSpec, detect_spec, num_layers
from .neurons import (
    MEMORY_TEXTS,
    Training,
    check_activation,
    memory_batch,
    mlp_path,
    read_io,
    residual_norm,
    resolve_activation,
)
from .patch import Patch
from .requests import EditRequest
from .result import Diagnostics, EditResult
from .stats import Statistics


@dataclass(frozen=True)
class CaliNetHyperParams:
    layer: int | None = None  # None: the last layer
    slots: int = 8  # calibration memory slots one edit (or batch) adds
    activation: str = "family"  # the family's MLP activation; or relu, gelu, gelu_tanh, silu
    steps: int = 100
    lr: float = 0.1  # Adam step on the values, in units of the residual stream's norm
    key_lr: float = 0.05  # Adam step on the keys, in pre-activation units
    locality_weight: float = 1.0  # KL on neutral text (0: off)
    stop_nll: float = 0.05
    prefixes: int = 2  # sampled context prefixes the targets are trained in
    prefix_length: int = 10
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("slots", "steps", "lr", "key_lr", "stop_nll", "prefix_length"):
            if getattr(self, name) <= 0:
                raise InvalidValueError(f"{name} must be positive", field=name)
        for name in ("locality_weight", "prefixes"):
            if getattr(self, name) < 0:
                raise InvalidValueError(f"{name} must not be negative", field=name)
        if self.slots > 256:
            raise InvalidValueError("slots is limited to 256", field="slots")
        check_activation(self.activation)

    def edited_layers(self, n_layers: int) -> list[int]:
        layers = [self.layer if self.layer is not None else n_layers - 1]
        check_layers(layers, n_layers, field="layer")
        return layers


def compute(
    model: PreTrainedModel,
    tok: PreTrainedTokenizerBase,
    requests: list[EditRequest],
    hparams: CaliNetHyperParams,
    stats: Statistics | None = None,
    *,
    spec: ModelSpec | None = None,
    progress: ProgressFn | None = None,
    prefixes: list[str] | None = None,
) -> EditResult:
    """Calibration slots that make the model say each target; the model is left unchanged."""
    del stats
    started = time.perf_counter()
    spec = detect_spec(model, spec)
    layer = hparams.edited_layers(num_layers(model, spec))[0]
    path = mlp_path(spec.mlp_out_path(layer))
    module = model.get_submodule(path)
    device = next(model.parameters()).device
    activation = resolve_activation(model, hparams.activation)
    diagnostics = Diagnostics(method="calinet", layers=[layer], prefixes=list(prefixes or []))

    contexts = list(dict.fromkeys(["", *(prefixes or [])]))
    batch = answer_batch(tok, requests, device, prefixes=contexts)
    rows, positions = batch.predicting()
    targets = batch.labels[rows, positions + 1]
    request_of_row = torch.arange(len(requests), device=device).repeat_interleave(len(contexts))
    request_of = request_of_row[rows]
    inputs, _ = read_io(model, module, batch.ids, batch.mask)
    queries = inputs[rows, positions]
    d_model = queries.shape[1]

    memory_ids, memory_mask = memory_batch(tok, list(MEMORY_TEXTS), device)
    with torch.no_grad():
        base_logits = model(input_ids=memory_ids, attention_mask=memory_mask).logits
        base_logp = torch.log_softmax(base_logits[memory_mask.bool()].float(), dim=-1)

    generator = torch.Generator().manual_seed(hparams.seed)
    q_norm = float(queries.norm(dim=1).mean().clamp_min(1e-6))
    keys = torch.randn(hparams.slots, d_model, generator=generator) / q_norm
    keys_t = keys.to(device).requires_grad_(True)
    bias = torch.zeros(hparams.slots, device=device)  # CaliNet's slots have no bias
    values_t = torch.zeros(hparams.slots, d_model, device=device, requires_grad=True)
    block = model.get_submodule(spec.layer_path(layer))
    residual = residual_norm(model, block, batch.ids, batch.mask)
    out_scale = float(residual[rows, positions].mean().clamp_min(1e-6))
    q_scale = float(queries.abs().sum(dim=1).mean().clamp_min(1e-6))
    optimizer = torch.optim.Adam(
        [
            {"params": [values_t], "lr": hparams.lr * out_scale / d_model**0.5},
            {"params": [keys_t], "lr": hparams.key_lr / q_scale},
        ]
    )
    training = Training(module, keys_t, bias, values_t, activation)
    with training:
        for step in range(hparams.steps):
            logits = model(input_ids=batch.ids, attention_mask=batch.mask, use_cache=False).logits
            token_nll = F.cross_entropy(logits[rows, positions].float(), targets, reduction="none")
            per_request = (
                torch.zeros(len(requests), device=device).index_add(
                    0, request_of, token_nll.detach()
                )
                / torch.bincount(request_of, minlength=len(requests)).float()
            )
            if step == 0:
                diagnostics.prob_before = torch.exp(-per_request).tolist()
            diagnostics.prob_after = torch.exp(-per_request).tolist()
            loss = token_nll.mean()
            if hparams.locality_weight > 0:
                logits_m = model(
                    input_ids=memory_ids, attention_mask=memory_mask, use_cache=False
                ).logits
                logp = torch.log_softmax(logits_m[memory_mask.bool()].float(), dim=-1)
                kl = F.kl_div(logp, base_logp, log_target=True, reduction="batchmean")
                loss = loss + hparams.locality_weight * kl
            diagnostics.losses.append(float(loss.detach()))
            diagnostics.steps = step + 1
            if progress:
                progress((step + 1) / hparams.steps, "train the calibration slots")
            if float(token_nll.detach().max()) < hparams.stop_nll:
                break
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()

    neurons = training.result()
    diagnostics.extra["neurons"] = len(neurons)
    diagnostics.seconds["total"] = time.perf_counter() - started
    patch = Patch("calinet", {}, {"layer": str(layer)}, neurons={path: neurons})
    return EditResult(patch, diagnostics)
