"""T-Patcher: one mistake worth one neuron (Huang et al., 2023).

No weight changes. Each edit adds neurons to the last layer's MLP (editors/neurons.py): for
MLP input q, neuron j adds a_j(q) v_j with a_j(q) = ReLU(q k_j + b_j). By default a neuron
per predicting position of the edit (the prompt's last token, then each target token but
the last, teacher-forced); with `neuron_per_token=False` one neuron per edit, firing at all
of them. Trained with the base model frozen, on

    L = L_e + a * l_a + m * (l_m1 + l_m2)

  L_e  = NLL(target | prompt)                                         (edit loss)
  l_a  = S(m_a - (q_e k_j + b_j))            over the neuron's own positions e: it fires
  l_m1 = S((q_i k_j + b_j) - beta)           over memory queries i: silent there (beta <= 0)
  l_m2 = S((q_i k_j + b_j) - (q_e k_j + b_j) + gamma)   and far below its own activation

with S(x) the paper's margin form: the mean of the positive entries (0 when none). The
memory queries are the MLP inputs at every position of some neutral text, of the sampled
context prefixes, and of every other position of the edit batch. Since the activation is a
ReLU and the memory pre-activations end below beta < 0, the neuron adds an exact zero where
it does not fire: inputs like the memory keep their outputs bit for bit.

Initialisation (deterministic, ours): k_j along q_e - mean(memory), scaled and shifted so
that the own positions start at m_a and the memory at or below beta where that direction
separates them (the paper starts from k = q_e / |q_e|^2, b = 0); v_j = 0, so training
starts from the unchanged model.
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
class TPatcherHyperParams:
    layer: int | None = None  # None: the last layer
    neuron_per_token: bool = True  # else one neuron per edit
    activation: str = "relu"  # or the family's ("family"), gelu, gelu_tanh, silu
    steps: int = 100
    lr: float = 0.1  # Adam step on the values, in units of the residual stream's norm
    key_lr: float = 0.1  # Adam step on keys and biases, in pre-activation units
    activation_weight: float = 1.0  # a
    memory_weight: float = 1.0  # m
    activation_margin: float = 1.0  # m_a: the least pre-activation on the edit
    memory_margin: float = -1.0  # beta: the most pre-activation on the memory (<= 0)
    gap_margin: float = 2.0  # gamma: how far the memory stays below the edit
    stop_nll: float = 0.05
    prefixes: int = 5  # sampled context prefixes, used as memory
    prefix_length: int = 10
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("steps", "lr", "key_lr", "activation_margin", "stop_nll", "prefix_length"):
            if getattr(self, name) <= 0:
                raise InvalidValueError(f"{name} must be positive", field=name)
        for name in ("activation_weight", "memory_weight", "gap_margin", "prefixes"):
            if getattr(self, name) < 0:
                raise InvalidValueError(f"{name} must not be negative", field=name)
        if self.memory_margin > 0:
            raise InvalidValueError("memory_margin must not be positive", field="memory_margin")
        check_activation(self.activation)

    def edited_layers(self, n_layers: int) -> list[int]:
        layers = [self.layer if self.layer is not None else n_layers - 1]
        check_layers(layers, n_layers, field="layer")
        return layers


def _margin(violation: torch.Tensor) -> torch.Tensor:
    """T-Patcher's margin loss: the mean of the positive entries, 0 when there are none."""
    positive = violation[violation > 0]
    return positive.mean() if positive.numel() else violation.new_zeros(())


def initial_neurons(
    own: torch.Tensor, memory: torch.Tensor, m_a: float, beta: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Key and bias of one neuron for its own queries [p, d] and memory queries [M, d]."""
    direction = own.mean(0) - memory.mean(0)
    key = direction / direction.dot(direction).clamp_min(1e-12)
    s_own, s_memory = own @ key, memory @ key  # s_own.mean() - s_memory.mean() == 1
    low, high = float(s_own.min()), float(s_memory.max())
    if low - high <= 0.05:  # no clean cut along this direction: place the means instead
        low, high = float(s_own.mean()), float(s_memory.mean())
    scale = (m_a - beta) / (low - high)
    return key * scale, torch.tensor(beta - scale * high)


def compute(
    model: PreTrainedModel,
    tok: PreTrainedTokenizerBase,
    requests: list[EditRequest],
    hparams: TPatcherHyperParams,
    stats: Statistics | None = None,
    *,
    spec: ModelSpec | None = None,
    progress: ProgressFn | None = None,
    prefixes: list[str] | None = None,
) -> EditResult:
    """Neurons that make the model say each target; the model is left unchanged."""
    del stats
    started = time.perf_counter()
    spec = detect_spec(model, spec)
    layer = hparams.edited_layers(num_layers(model, spec))[0]
    path = mlp_path(spec.mlp_out_path(layer))
    module = model.get_submodule(path)
    device = next(model.parameters()).device
    activation = resolve_activation(model, hparams.activation)
    diagnostics = Diagnostics(method="t-patcher", layers=[layer], prefixes=list(prefixes or []))

    batch = answer_batch(tok, requests, device)
    rows, positions = batch.predicting()
    targets = batch.labels[rows, positions + 1]
    inputs, _ = read_io(model, module, batch.ids, batch.mask)
    n_rows, width = batch.ids.shape

    # which neuron fires where: own[position index in the flat batch, neuron]
    flat = rows * width + positions
    n_neurons = len(flat) if hparams.neuron_per_token else len(requests)
    owner = torch.arange(len(flat), device=device) if hparams.neuron_per_token else rows
    own = torch.zeros(n_rows * width, n_neurons, dtype=torch.bool, device=device)
    own[flat, owner] = True
    valid = batch.mask.reshape(-1).bool()
    texts = [*MEMORY_TEXTS, *(p for p in (prefixes or []) if p.strip())]
    memory_ids, memory_mask = memory_batch(tok, texts, device)
    memory_inputs, _ = read_io(model, module, memory_ids, memory_mask)
    memory = memory_inputs[memory_mask.bool()]  # [M, d]
    queries = inputs.reshape(n_rows * width, -1)

    keys, biases = [], []
    for j in range(n_neurons):
        mine = own[:, j]
        others = torch.cat([memory, queries[valid & ~mine]])
        key, bias = initial_neurons(
            queries[mine], others, hparams.activation_margin, hparams.memory_margin
        )
        keys.append(key)
        biases.append(bias)
    d_model = queries.shape[1]
    keys_t = torch.stack(keys).requires_grad_(True)
    bias_t = torch.stack(biases).to(device).requires_grad_(True)
    values_t = torch.zeros(n_neurons, d_model, device=device, requires_grad=True)
    block = model.get_submodule(spec.layer_path(layer))
    residual = residual_norm(model, block, batch.ids, batch.mask)
    out_scale = float(residual[rows, positions].mean().clamp_min(1e-6))
    q_scale = float(queries[flat].abs().sum(dim=1).mean().clamp_min(1e-6))  # mean |q|_1
    optimizer = torch.optim.Adam(
        [
            {"params": [values_t], "lr": hparams.lr * out_scale / d_model**0.5},
            {"params": [keys_t], "lr": hparams.key_lr / q_scale},
            {"params": [bias_t], "lr": hparams.key_lr},
        ]
    )
    negatives = valid[:, None] & ~own  # batch positions each neuron must stay silent at
    training = Training(module, keys_t, bias_t, values_t, activation)
    m_a, beta, gamma = hparams.activation_margin, hparams.memory_margin, hparams.gap_margin
    with training:
        for step in range(hparams.steps):
            logits = model(input_ids=batch.ids, attention_mask=batch.mask, use_cache=False).logits
            token_nll = F.cross_entropy(logits[rows, positions].float(), targets, reduction="none")
            per_request = (
                torch.zeros(len(requests), device=device).index_add(0, rows, token_nll.detach())
                / torch.bincount(rows, minlength=len(requests)).float()
            )
            if step == 0:
                diagnostics.prob_before = torch.exp(-per_request).tolist()
            diagnostics.prob_after = torch.exp(-per_request).tolist()

            batch_pre = training.pre_activations(queries)  # [positions, n]
            memory_pre = training.pre_activations(memory)  # [M, n]
            own_pre = batch_pre[own]
            least = torch.where(own, batch_pre, torch.full_like(batch_pre, torch.inf)).amin(0)
            other_pre = torch.cat([memory_pre.reshape(-1), batch_pre[negatives]])
            other_neuron = torch.cat(
                [
                    torch.arange(n_neurons, device=device).repeat(len(memory)),
                    torch.nonzero(negatives, as_tuple=True)[1],
                ]
            )
            l_a = _margin(m_a - own_pre)
            l_m1 = _margin(other_pre - beta)
            l_m2 = _margin(other_pre - least[other_neuron] + gamma)
            loss = (
                token_nll.mean()
                + hparams.activation_weight * l_a
                + hparams.memory_weight * (l_m1 + l_m2)
            )
            diagnostics.losses.append(float(loss.detach()))
            diagnostics.steps = step + 1
            if progress:
                progress((step + 1) / hparams.steps, "train the patch neurons")
            satisfied = float(l_a.detach()) == 0.0 and float((l_m1 + l_m2).detach()) == 0.0
            if float(token_nll.detach().max()) < hparams.stop_nll and satisfied:
                break
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()

    neurons = training.result()
    with torch.no_grad():
        final_memory = training.pre_activations(memory)
        final_own = training.pre_activations(queries)[own]
    diagnostics.extra["neurons"] = len(neurons)
    diagnostics.extra["edit_activation_min"] = float(final_own.min())
    diagnostics.extra["memory_activation_max"] = float(final_memory.max())
    diagnostics.seconds["total"] = time.perf_counter() - started
    patch = Patch("t-patcher", {}, {"layer": str(layer)}, neurons={path: neurons})
    return EditResult(patch, diagnostics)
