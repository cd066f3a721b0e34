"""Keys: the MLP output projection's input at the subject's last token."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..model_spec import ModelSpec
from ..requests import EditRequest
from ..tokens import PromptIds, locate
from ..tracing import forward_until, hidden_of, record_inputs


@dataclass(frozen=True)
class Keys:
    """Per-request keys at one layer: prefix-averaged, from the bare prompt, and per context."""

    mean: torch.Tensor  # [n, d_in]
    bare: torch.Tensor  # [n, d_in]
    contexts: torch.Tensor  # [n, prefixes, d_in] one per context prefix, bare prompt first


def right_padded(rows: list[list[int]], pad_id: int, device: torch.device):
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros((len(rows), width), dtype=torch.long, device=device)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row, device=device)
        mask[i, : len(row)] = 1
    return ids, mask


def pad_id_of(tok: PreTrainedTokenizerBase) -> int:
    for candidate in (tok.pad_token_id, tok.eos_token_id, 0):
        if candidate is not None:
            return int(candidate)
    return 0


def located_rows(
    tok: PreTrainedTokenizerBase, requests: list[EditRequest], prefixes: list[str]
) -> list[PromptIds]:
    """Every request under every context prefix, request-major (its prefixes in order)."""
    return [locate(tok, p, r.prompt, r.subject, None) for r in requests for p in prefixes]


@dataclass(frozen=True)
class SubjectRows:
    """Located prompts as one right-padded batch, each row ending at the subject's last
    token (causal attention makes the tokens after it irrelevant), and that token's column."""

    ids: torch.Tensor  # [rows, width]
    mask: torch.Tensor  # [rows, width]
    cols: torch.Tensor  # [rows]

    @classmethod
    def of(
        cls, tok: PreTrainedTokenizerBase, located: list[PromptIds], device: torch.device
    ) -> SubjectRows:
        ids, mask = right_padded(
            [c.prompt_ids[: c.lookup + 1] for c in located], pad_id_of(tok), device
        )
        return cls(ids, mask, torch.tensor([c.lookup for c in located], device=device))


@torch.no_grad()
def keys_at(
    model: PreTrainedModel,
    tok: PreTrainedTokenizerBase,
    spec: ModelSpec,
    located: list[PromptIds],
    layers: list[int],
    chunk_rows: int = 64,
) -> dict[int, torch.Tensor]:
    """The key at each located prompt's subject token, at every layer in `layers`:
    [len(located), d_in] per layer, from one batched pass per chunk."""
    device = next(model.parameters()).device
    paths = [spec.mlp_out_path(layer) for layer in layers]
    gathered: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
    for start in range(0, len(located), chunk_rows):
        chunk = SubjectRows.of(tok, located[start : start + chunk_rows], device)
        rows = torch.arange(len(chunk.cols), device=device)
        with record_inputs(model, paths) as seen:
            forward_until(
                model,
                paths[layers.index(max(layers))],
                input_ids=chunk.ids,
                attention_mask=chunk.mask,
                use_cache=False,
            )
        for layer, path in zip(layers, paths, strict=True):
            gathered[layer].append(seen[path][rows, chunk.cols].float())
    return {layer: torch.cat(gathered[layer]) for layer in layers}


def compute_keys(
    model: PreTrainedModel,
    tok: PreTrainedTokenizerBase,
    spec: ModelSpec,
    requests: list[EditRequest],
    prefixes: list[str],
    layers: list[int],
) -> dict[int, Keys]:
    """Keys of every request at every layer in `layers`.

    `prefixes[0]` must be the empty prefix (the bare prompt).
    """
    located = located_rows(tok, requests, prefixes)
    result = {}
    for layer, rows in keys_at(model, tok, spec, located, layers).items():
        per_row = rows.view(len(requests), len(prefixes), -1)
        result[layer] = Keys(mean=per_row.mean(dim=1), bare=per_row[:, 0], contexts=per_row)
    return result


@torch.no_grad()
def residual_at_subject(
    model: PreTrainedModel,
    tok: PreTrainedTokenizerBase,
    spec: ModelSpec,
    requests: list[EditRequest],
    layer: int,
    module: str | None = None,
) -> torch.Tensor:
    """Output of block `layer` at the subject's last token of each bare prompt: [n, d]; with
    `module` (the path of a module inside that block) that module's output there instead."""
    device = next(model.parameters()).device
    bare = SubjectRows.of(tok, located_rows(tok, requests, [""]), device)
    captured: dict[str, torch.Tensor] = {}
    read = model.get_submodule(module or spec.layer_path(layer))
    handle = read.register_forward_hook(
        lambda _m, _a, out: captured.setdefault("h", hidden_of(out).detach())
    )
    try:
        forward_until(
            model,
            spec.layer_path(layer),
            input_ids=bare.ids,
            attention_mask=bare.mask,
            use_cache=False,
        )
    finally:
        handle.remove()
    rows = torch.arange(len(bare.cols), device=device)
    return captured["h"][rows, bare.cols].float()
