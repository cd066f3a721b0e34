"""KN: knowledge neurons (Dai et al., 2022).

Locate the MLP neurons that express a fact by integrated gradients, then move their value
vectors away from the old answer's output embedding and towards the new target's.

Attribution. Each prompt variant p (the prompt under each context prefix; with
`use_paraphrases` also the request's paraphrases) is read at its last token. With a_l the
input of layer l's MLP output projection there (the intermediate neuron activations) and y
the first token of the old answer (target_true, else the model's greedy next token):

  Attr_p(l, i) = a_l[i] / m * sum_{k=1..m} dP(y | p; a_l <- (k/m) a_l) / da_l[i]     (m = steps)

Refining. The coarse neurons of p are those with Attr_p > adaptive_threshold * max Attr_p;
the knowledge neurons are those coarse in at least `percentage` of the variants (at most
`max_neurons`, largest mean attribution first).

Update. Each knowledge neuron's value vector v (its column of W_out in [out, in] layout):

  v' = v + s |v| (enhance * e_new - erase * e_old)

with e_new, e_old the unit output-embedding (unembedding) rows of the new target's and the
old answer's first tokens (the authors' code scales both by |v| the same way), and s the sign
of the neuron's mean activation on the variants: BERT's GELU neurons that carry a fact fire
positively, but gated (SwiGLU) neurons fire with either sign, and v moves so that what the
neuron adds at the fact's prompts moves towards the new target. The patch holds one factored
delta per touched layer, W += V S^T with S one-hot columns selecting the neurons: the selected
value vectors change and every other weight gets an exact zero (the patch format's factored
form stores this row-restricted delta compactly: (d_model + d_ff) x r numbers per layer).
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import time
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .core.answers import target_probabilities
from .core.values import ProgressFn
from .errors import InvalidValueError
from .hparams import check_layers
from .model_spec import ModelSpec, detect_spec, edited_weight, get_module, num_layers
from .patch import AppliedPatch, Delta, Patch, apply_patch, revert_patch
from .prefixes import sample_prefixes
from .requests import EditRequest, with_leading_space
from .result import Diagnostics, EditResult
from .stats import Statistics
from .tokens import encode_answer, encode_prompt
from .tracing import frozen_below
from .weights import factored, linear_weight

Neuron = tuple[int, int]  # (layer, index of the intermediate neuron)

_ROWS_PER_PASS = 256  # (variant, layer, step) rows a pass of the attribution runs at most


@dataclass(frozen=True)
class KNHyperParams:
    layers: tuple[int, ...] | None = None  # attributed layers; None: every layer
    steps: int = 20  # Riemann steps of the integrated gradients (the paper's m)
    adaptive_threshold: float = 0.2  # coarse: above this share of the variant's largest score
    percentage: float = 0.5  # refined: coarse in at least this share of the prompt variants
    max_neurons: int = 10
    erase: float = 1.0  # in units of |v|, along the old answer's embedding
    enhance: float = 1.0  # in units of |v|, along the new target's embedding
    use_paraphrases: bool = False  # the request's paraphrases become prompt variants too
    prefixes: int = 3  # sampled context prefixes (prompt variants), besides the bare prompt
    prefix_length: int = 10
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("steps", "max_neurons", "prefix_length"):
            if getattr(self, name) < 1:
                raise InvalidValueError(f"{name} must be at least 1", field=name)
        if not 0 < self.adaptive_threshold <= 1:
            raise InvalidValueError(
                "adaptive_threshold must lie in (0, 1]", field="adaptive_threshold"
            )
        if not 0 <= self.percentage <= 1:
            raise InvalidValueError("percentage must lie in [0, 1]", field="percentage")
        for name in ("erase", "enhance", "prefixes"):
            if getattr(self, name) < 0:
                raise InvalidValueError(f"{name} must not be negative", field=name)
        if self.layers is not None and (
            not self.layers or list(self.layers) != sorted(set(self.layers))
        ):
            raise InvalidValueError("layers must be distinct and ascending", field="layers")

    def edited_layers(self, n_layers: int) -> list[int]:
        """The layers whose neurons are attributed (an edit touches some of them)."""
        layers = list(self.layers) if self.layers is not None else list(range(n_layers))
        check_layers(layers, n_layers)
        return layers


def compute(
    model: PreTrainedModel,
    tok: PreTrainedTokenizerBase,
    requests: list[EditRequest],
    hparams: KNHyperParams,
    stats: Statistics | None = None,
    *,
    spec: ModelSpec | None = None,
    progress: ProgressFn | None = None,
    prefixes: list[str] | None = None,
) -> EditResult:
    """Edit `requests` one after another (each on the weights the previous ones leave); the
    model is restored exactly afterwards. `prefixes` (from an earlier result) skip sampling."""
    del stats  # KN reads no statistics
    started = time.perf_counter()
    spec = detect_spec(model, spec)
    layers = hparams.edited_layers(num_layers(model, spec))
    if prefixes is None:
        prefixes = sample_prefixes(
            model, tok, hparams.prefixes, hparams.prefix_length, hparams.seed
        )
    diagnostics = Diagnostics(method="kn", layers=[], steps=hparams.steps, prefixes=prefixes)
    diagnostics.extra.update(neurons=[], old_answer=[], variants=[], fallback=[])
    patch: Patch | None = None
    applied: list[AppliedPatch] = []
    try:
        for index, request in enumerate(requests):

            def step(fraction: float, stage: str, index: int = index) -> None:
                if progress:
                    progress((index + fraction) / len(requests), stage)

            diagnostics.prob_before.extend(target_probabilities(model, tok, [request], prefixes))
            one = _edit_one(model, tok, spec, request, prefixes, layers, hparams, diagnostics, step)
            applied.append(apply_patch(model, one))
            diagnostics.prob_after.extend(target_probabilities(model, tok, [request], prefixes))
            patch = one if patch is None else patch.merged(one)
    finally:
        for record in reversed(applied):
            revert_patch(model, record)
    assert patch is not None
    touched = sorted({layer for found in diagnostics.extra["neurons"] for layer, _ in found})
    diagnostics.layers = touched
    patch.metadata["neurons"] = ";".join(
        ",".join(f"{layer}:{i}" for layer, i in found) for found in diagnostics.extra["neurons"]
    )
    diagnostics.delta_norms = patch.delta_norms()
    diagnostics.seconds["total"] = time.perf_counter() - started
    return EditResult(patch, diagnostics)


def _edit_one(
    model: PreTrainedModel,
    tok: PreTrainedTokenizerBase,
    spec: ModelSpec,
    request: EditRequest,
    prefixes: list[str],
    layers: list[int],
    hparams: KNHyperParams,
    diagnostics: Diagnostics,
    progress: ProgressFn,
) -> Patch:
    t0 = time.perf_counter()
    variants = [encode_prompt(tok, prefix + request.text) for prefix in prefixes]
    if hparams.use_paraphrases:
        variants += [encode_prompt(tok, text) for text in request.paraphrases]
    old = _old_answer(model, tok, request, variants[0])
    new = encode_answer(tok, request.target)[0]
    found = integrated_gradients(model, spec, variants, old, layers, hparams.steps, progress)
    neurons, fallback = select_neurons(
        found.scores, layers, hparams.adaptive_threshold, hparams.percentage, hparams.max_neurons
    )
    t1 = time.perf_counter()
    signs = [found.sign(layers.index(layer), i) for layer, i in neurons]
    deltas = value_update(model, spec, neurons, signs, new, old, hparams.enhance, hparams.erase)
    diagnostics.extra["neurons"].append([list(n) for n in neurons])
    diagnostics.extra["old_answer"].append(tok.decode([old]))
    diagnostics.extra["variants"].append(len(variants))
    diagnostics.extra["fallback"].append(fallback)
    for stage, seconds in (("attribution", t1 - t0), ("update", time.perf_counter() - t1)):
        diagnostics.seconds[stage] = diagnostics.seconds.get(stage, 0.0) + seconds
    return Patch("kn", deltas)


@torch.no_grad()
def _old_answer(
    model: PreTrainedModel, tok: PreTrainedTokenizerBase, request: EditRequest, ids: list[int]
) -> int:
    """First token of the fact's present answer: target_true, else the greedy next token."""
    if request.target_true is not None:
        return encode_answer(tok, with_leading_space(request.target_true))[0]
    device = next(model.parameters()).device
    logits = model(input_ids=torch.tensor([ids], device=device)).logits
    return int(logits[0, -1].argmax())


@dataclass(frozen=True)
class Attribution:
    scores: torch.Tensor  # [variants, layers, d_ff]: Attr_p(l, i)
    activations: torch.Tensor  # [variants, layers, d_ff]: a_l[i] at each variant's last token

    def sign(self, layer_row: int, index: int) -> float:
        """+1 or -1: the sign of the neuron's mean activation over the variants."""
        return -1.0 if float(self.activations[:, layer_row, index].mean()) < 0 else 1.0


def integrated_gradients(
    model: PreTrainedModel,
    spec: ModelSpec,
    variants: list[list[int]],
    answer: int,
    layers: list[int],
    steps: int,
    progress: ProgressFn | None = None,
    rows_per_pass: int = _ROWS_PER_PASS,
) -> Attribution:
    """Attr_p(l, i) of every variant p (token ids) and layer l in `layers`:
    [len(variants), len(layers), d_ff], at each variant's last token for P(answer) next.

    One row per (variant, layer, step); a row scales its own layer's activations at its last
    token and nothing else. That changes neither the tokens before the last (causal attention:
    they sit in a KV cache computed once) nor the blocks below the row's layer. Consecutive
    layers share a pass: the blocks below the lowest of them are stubbed with their output
    at the last token, computed once, so a pass runs one token per row from there up."""
    device = next(model.parameters()).device
    blocks = get_module(model, spec.layers)
    n = len(variants)
    cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else None
    width = max(len(ids) for ids in variants)
    # left-padded: every variant's last token in the last column, at its own position
    mask = torch.tensor(
        [[0] * (width - len(ids)) + [1] * len(ids) for ids in variants], device=device
    )
    positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
    padded = torch.tensor([[0] * (width - len(ids)) + ids for ids in variants], device=device)
    with torch.no_grad():
        past = None
        if width > 1:
            past = model.base_model(
                input_ids=padded[:, :-1],
                attention_mask=mask[:, :-1],
                position_ids=positions[:, :-1],
                use_cache=True,
            ).past_key_values
        seen: dict[str, object] = {}
        handle = blocks[0].register_forward_hook(lambda _m, _a, out: seen.setdefault("out", out))
        try:
            clean = model.base_model(
                input_ids=padded[:, -1:],
                attention_mask=mask,
                position_ids=positions[:, -1:],
                output_hidden_states=True,
                use_cache=past is not None,
                **{cache_arg or "past_key_values": copy.deepcopy(past)},
            )
        finally:
            handle.remove()
    alphas = torch.arange(1, steps + 1, device=device, dtype=torch.float32) / steps
    per_pass = max(1, rows_per_pass // (n * steps))
    scores, activations = [], []
    for start in range(0, len(layers), per_pass):
        group = layers[start : start + per_pass]
        repeat = len(group) * steps  # rows per variant: layer-major, then step
        cache = None
        if past is not None:
            cache = copy.deepcopy(past)
            cache.batch_repeat_interleave(repeat)  # type: ignore[attr-defined]
        entering = clean.hidden_states[group[0]][:, -1:].repeat_interleave(repeat, dim=0)
        leaves: dict[int, torch.Tensor] = {}
        actual: dict[int, torch.Tensor] = {}
        handles = [
            get_module(model, spec.mlp_out_path(layer)).register_forward_pre_hook(
                _scaler(j, layer, n, len(group), alphas, leaves, actual)
            )
            for j, layer in enumerate(group)
        ]
        try:
            with _below(blocks, group[0], entering, seen["out"]), torch.enable_grad():
                logits = model(
                    input_ids=padded[:, -1:].repeat_interleave(repeat, dim=0),
                    attention_mask=mask.repeat_interleave(repeat, dim=0),
                    position_ids=positions[:, -1:].repeat_interleave(repeat, dim=0),
                    use_cache=cache is not None,
                    **{cache_arg or "past_key_values": cache},
                ).logits
                prob = torch.softmax(logits[:, -1].float(), dim=-1)[:, answer]
                grads = torch.autograd.grad(prob.sum(), [leaves[layer] for layer in group])
        finally:
            for handle in handles:
                handle.remove()
        for layer, grad in zip(group, grads, strict=True):
            mean_grad = grad.float().view(n, steps, -1).mean(dim=1)
            scores.append(actual[layer] * mean_grad)  # [variants, d_ff]
            activations.append(actual[layer])
        if progress:
            progress(len(scores) / len(layers), "attribute neurons")
    return Attribution(torch.stack(scores, dim=1), torch.stack(activations, dim=1))


def _scaler(
    j: int,
    layer: int,
    variants: int,
    group: int,
    alphas: torch.Tensor,
    leaves: dict[int, torch.Tensor],
    actual: dict[int, torch.Tensor],
):
    """Pre-hook of layer `layer`'s MLP output projection, the j-th of its pass: its rows' last
    token activations replaced by alpha_k times themselves (a leaf for the gradient)."""
    steps = len(alphas)

    def hook(_module: torch.nn.Module, args: tuple) -> tuple:
        x = args[0]  # [variants * group * steps, 1, d_ff]
        blocks = x.view(variants, group, steps, *x.shape[1:])
        a = blocks[:, j, 0, -1].detach()  # [variants, d_ff]: nothing below is scaled yet
        actual[layer] = a.float()
        scaled = alphas[None, :, None].to(a.dtype) * a[:, None, :]  # [variants, steps, d_ff]
        leaves[layer] = scaled.reshape(variants * steps, -1).requires_grad_(True)
        rows = torch.arange(variants * group * steps, device=x.device).view(variants, group, steps)
        mine = rows[:, j].reshape(-1)
        x = x.clone()
        x[mine, -1] = leaves[layer]
        return (x, *args[1:])

    return hook


def _below(blocks: torch.nn.Module, layer: int, entering: torch.Tensor, example: object):
    """Blocks below `layer` stubbed out, the last of them returning `entering`."""
    if layer == 0:
        return contextlib.nullcontext()
    return frozen_below(blocks, layer - 1, lambda: entering, example)  # type: ignore[arg-type]


def select_neurons(
    scores: torch.Tensor,
    layers: list[int],
    adaptive_threshold: float,
    percentage: float,
    max_neurons: int,
) -> tuple[list[Neuron], bool]:
    """The knowledge neurons from the variants' scores [variants, len(layers), d_ff]: coarse in at
    least `percentage` of the variants, largest mean score first, at most `max_neurons`;
    (layer, index) sorted. When none is shared enough, the neuron with the largest mean
    score alone (the second value says so)."""
    stacked = scores.float()
    peak = stacked.flatten(1).max(dim=1).values  # [variants]
    coarse = (stacked > (adaptive_threshold * peak)[:, None, None]) & (peak > 0)[:, None, None]
    counts = coarse.sum(dim=0).flatten()
    mean = stacked.mean(dim=0).flatten()
    needed = max(1.0, percentage * stacked.shape[0])
    order = torch.argsort(-mean, stable=True)  # ties: the lower (layer, index) first
    kept = order[counts[order] >= needed - 1e-9][:max_neurons]
    fallback = len(kept) == 0
    if fallback:
        kept = order[:1]
    width = stacked.shape[2]
    found = sorted((layers[int(f) // width], int(f) % width) for f in kept)
    return found, fallback


@torch.no_grad()
def value_update(
    model: PreTrainedModel,
    spec: ModelSpec,
    neurons: list[Neuron],
    signs: list[float],
    new_token: int,
    old_token: int,
    enhance: float,
    erase: float,
) -> dict[str, Delta]:
    """Per touched layer, the factored delta V S^T: V's columns the value-vector changes
    s |v| (enhance e_new - erase e_old), S's the one-hot selectors of the neurons; s is the
    sign of the neuron's activation on the fact's prompts, so that the change its value
    vector makes there points towards the new target."""
    embeddings = model.get_output_embeddings().weight.float()
    e_new = embeddings[new_token] / embeddings[new_token].norm().clamp_min(1e-12)
    e_old = embeddings[old_token] / embeddings[old_token].norm().clamp_min(1e-12)
    direction = enhance * e_new - erase * e_old
    deltas: dict[str, Delta] = {}
    for layer in sorted({layer for layer, _ in neurons}):
        mine = [k for k, (lay, _) in enumerate(neurons) if lay == layer]
        index = torch.tensor([neurons[k][1] for k in mine], device=direction.device)
        sign = torch.tensor([signs[k] for k in mine], device=direction.device)
        weight = linear_weight(spec, edited_weight(model, spec, layer)).float()  # [out, in]
        scale = sign * weight[:, index].norm(dim=0)
        change = scale[None, :] * direction[:, None]  # [out, r]
        select = torch.zeros((weight.shape[1], len(index)), device=direction.device)
        select[index, torch.arange(len(index), device=direction.device)] = 1.0
        deltas[spec.weight_name(layer)] = factored(spec, change, select)
    return deltas
