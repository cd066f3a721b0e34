"""Walking up the edited layers with the hidden states below them cached.

A sweep edits its layers in ascending order, and an edit at layer l changes nothing below
it. So the hidden states entering the next edited layer are kept: that layer's keys run one
block, the top residual runs only the blocks from it up, and after the edit one block brings
the cache up to date. Rows end at the subject's last token, the only position read (causal
attention makes the tokens after it irrelevant). The passes run over chunks of whole
requests, so the activations of one pass stay bounded however large the batch; the cache
holds one hidden state per row token, the least a walk can keep.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..model_spec import ModelSpec, get_module
from ..requests import EditRequest
from ..tracing import forward_until, frozen_below, hidden_of, record_inputs
from .keys import SubjectRows, located_rows


@dataclass
class _Chunk:
    rows: SubjectRows  # whole requests: each one's contexts, the bare prompt first
    bare: torch.Tensor  # the bare prompts' row indices within the chunk
    hidden: torch.Tensor | None = None  # output of the highest block walked past
    example: Any = None  # one real block output: the structure stubs return


class LayerWalk:
    """The requests' rows (every context prefix, the bare prompt first) and the output of
    the highest block walked past, on the model's current weights."""

    def __init__(
        self,
        model: PreTrainedModel,
        tok: PreTrainedTokenizerBase,
        spec: ModelSpec,
        requests: list[EditRequest],
        prefixes: list[str],
        chunk_rows: int = 64,
    ) -> None:
        self.model, self.spec = model, spec
        self.blocks = get_module(model, spec.layers)
        device = next(model.parameters()).device
        located = located_rows(tok, requests, prefixes)
        self.requests, self.contexts = len(requests), len(prefixes)
        step = max(chunk_rows // self.contexts, 1) * self.contexts
        self.chunks = [
            _Chunk(
                SubjectRows.of(tok, located[start : start + step], device),
                torch.arange(0, len(located[start : start + step]), self.contexts, device=device),
            )
            for start in range(0, len(located), step)
        ]
        self.below = -1  # the block whose output the chunks hold; -1: none walked yet

    @torch.no_grad()
    def keys(self, layer: int) -> torch.Tensor:
        """Prefix-averaged keys at `layer` [n, d_in]; `layer` must be above the walk."""
        path = self.spec.mlp_out_path(layer)
        found = []
        for chunk in self.chunks:
            rows = torch.arange(len(chunk.rows.cols), device=chunk.rows.ids.device)
            with self._from_cache(chunk, rows), record_inputs(self.model, [path]) as seen:
                forward_until(
                    self.model,
                    path,
                    input_ids=chunk.rows.ids,
                    attention_mask=chunk.rows.mask,
                    use_cache=False,
                )
            found.append(seen[path][rows, chunk.rows.cols].float())
        return torch.cat(found).view(self.requests, self.contexts, -1).mean(dim=1)

    @torch.no_grad()
    def block_output(self, layer: int, module: str | None = None) -> torch.Tensor:
        """Output of block `layer` at each bare prompt's subject [n, d]; with `module` (the
        path of a module inside that block) that module's output there instead."""
        outputs = []
        for chunk in self.chunks:
            out, _ = self._run_to(chunk, layer, chunk.bare, module)
            picked = torch.arange(len(chunk.bare), device=out.device)
            outputs.append(out[picked, chunk.rows.cols[chunk.bare]].float())
        return torch.cat(outputs)

    @torch.no_grad()
    def advance(self, layer: int) -> None:
        """Walk past block `layer` (on the current weights, after its edit)."""
        for chunk in self.chunks:
            rows = torch.arange(len(chunk.rows.cols), device=chunk.rows.ids.device)
            chunk.hidden, chunk.example = self._run_to(chunk, layer, rows)
        self.below = layer

    def _run_to(
        self, chunk: _Chunk, layer: int, rows: torch.Tensor, module: str | None = None
    ) -> tuple[torch.Tensor, Any]:
        """Block `layer`'s hidden output (or `module`'s output) and the block's own output."""
        captured: dict[str, Any] = {}
        block = self.blocks[layer]
        handles = [block.register_forward_hook(lambda _m, _a, out: captured.setdefault("out", out))]
        if module is not None:
            handles.append(
                self.model.get_submodule(module).register_forward_hook(
                    lambda _m, _a, out: captured.setdefault("module", out)
                )
            )
        try:
            with self._from_cache(chunk, rows):
                forward_until(
                    self.model,
                    self.spec.layer_path(layer),
                    input_ids=chunk.rows.ids[rows],
                    attention_mask=chunk.rows.mask[rows],
                    use_cache=False,
                )
        finally:
            for handle in handles:
                handle.remove()
        read = captured["module"] if module is not None else captured["out"]
        return hidden_of(read).detach(), captured["out"]

    @contextmanager
    def _from_cache(self, chunk: _Chunk, rows: torch.Tensor) -> Iterator[None]:
        if chunk.hidden is None:
            yield
            return
        hidden = chunk.hidden[rows]
        with frozen_below(self.blocks, self.below, lambda: hidden, chunk.example):
            yield
