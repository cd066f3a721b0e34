"""GRACE: lifelong editing with a discrete key-value adaptor (Hartvigsen et al., 2023).

No weight changes. At one layer's MLP output module, an edit adds codebook entries
(editors/codebook.py): for every position t whose next token is a target token (the prompt's
last token, then each target token but the last, teacher-forced),
  key    k_t = the module's input at t                 (what the model computes there now)
  value  v_t = argmin_v  NLL(target | prompt)  with the module's output at t replaced by v_t
  radius r_t = radius * |k_t|                           (inputs this close to k_t trigger it)
The values of all positions and requests are optimised together, starting from the
module's own outputs. An entry fires only near its key, so what the edit does not touch
keeps its output exactly: high locality, and paraphrases generalise only when their keys
fall inside a radius.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .codebook import Codebook
from .core.answers import answer_batch
from .core.values import ProgressFn
from .errors import InvalidValueError
from .hparams import check_layers, layer_at
from .model_spec import ModelSpec, detect_spec, num_layers
from .patch import Patch
from .requests import EditRequest
from .result import Diagnostics, EditResult
from .stats import Statistics


@dataclass(frozen=True)
class GRACEHyperParams:
    layer: int | None = None  # None: the layer at `layer_fraction` of the depth
    layer_fraction: float = 0.8
    radius: float = 0.05  # an entry fires within this fraction of its key's norm
    steps: int = 60
    lr: float = 0.05  # Adam step on the values, in units of the outputs' mean norm
    stop_nll: float = 0.05
    prefixes: int = 0  # keys come from the bare prompts
    prefix_length: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("radius", "steps", "lr", "stop_nll", "layer_fraction"):
            if getattr(self, name) <= 0:
                raise InvalidValueError(f"{name} must be positive", field=name)

    def edited_layers(self, n_layers: int) -> list[int]:
        layers = [self.layer if self.layer is not None else layer_at(self.layer_fraction, n_layers)]
        check_layers(layers, n_layers, field="layer")
        return layers


def compute(
    model: PreTrainedModel,
    tok: PreTrainedTokenizerBase,
    requests: list[EditRequest],
    hparams: GRACEHyperParams,
    stats: Statistics | None = None,
    *,
    spec: ModelSpec | None = None,
    progress: ProgressFn | None = None,
    prefixes: list[str] | None = None,
) -> EditResult:
    """Codebook entries that make the model say each target; the model is left unchanged."""
    del stats, prefixes  # GRACE needs neither statistics nor context prefixes
    started = time.perf_counter()
    spec = detect_spec(model, spec)
    layer = hparams.edited_layers(num_layers(model, spec))[0]
    path = spec.mlp_out_path(layer)
    module = model.get_submodule(path)
    device = next(model.parameters()).device
    batch = answer_batch(tok, requests, device)
    rows, positions = batch.predicting()  # one entry each; its request is its row
    diagnostics = Diagnostics(method="grace", layers=[layer])

    # The first forward both reads the keys and starting outputs and (with the values still
    # equal to those outputs) gives the first loss: no separate read-only pass.
    seen: dict[str, torch.Tensor] = {}

    def replace(_m: torch.nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        if "values" not in seen:
            seen["keys"] = args[0][rows, positions].detach().float()
            seen["values"] = output[rows, positions].detach().float().requires_grad_(True)
        output = output.clone()
        output[rows, positions] = seen["values"].to(output.dtype)
        return output

    targets = batch.labels[rows, positions + 1]
    optimizer: torch.optim.Optimizer | None = None
    handle = module.register_forward_hook(replace)
    try:
        for step in range(hparams.steps):
            logits = model(input_ids=batch.ids, attention_mask=batch.mask, use_cache=False).logits
            values = seen["values"]
            if optimizer is None:
                scale = float(values.detach().norm(dim=1).mean().clamp_min(1e-6))
                step_size = hparams.lr * scale / values.shape[1] ** 0.5
                optimizer = torch.optim.Adam([values], lr=step_size)
            token_nll = F.cross_entropy(logits[rows, positions].float(), targets, reduction="none")
            per_request = (
                torch.zeros(len(requests), device=device).index_add(0, rows, token_nll.detach())
                / torch.bincount(rows, minlength=len(requests)).float()
            )
            if step == 0:
                diagnostics.prob_before = torch.exp(-per_request).tolist()
            diagnostics.prob_after = torch.exp(-per_request).tolist()
            loss = token_nll.mean()
            diagnostics.losses.append(float(loss.detach()))
            diagnostics.steps = step + 1
            if progress:
                progress((step + 1) / hparams.steps, "optimise codebook values")
            if float(token_nll.detach().max()) < hparams.stop_nll:
                break
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    finally:
        handle.remove()

    keys, values = seen["keys"], seen["values"]
    radii = hparams.radius * keys.norm(dim=1)
    contexts = tuple(
        batch.ids[row, : position + 1].cpu()
        for row, position in zip(rows.tolist(), positions.tolist(), strict=True)
    )
    book = Codebook(keys.cpu().contiguous(), values.detach().float().cpu(), radii.cpu(), contexts)
    patch = Patch("grace", {}, {"layer": str(layer)}, codebooks={path: book})
    diagnostics.extra["entries"] = len(book)
    diagnostics.seconds["total"] = time.perf_counter() - started
    return EditResult(patch, diagnostics)
