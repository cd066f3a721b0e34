"""Walking up the edited layers with the hidden states below them cached.

A sweep edits its layers in ascending order, and an edit at layer l changes nothing below
it. So the hidden states entering the next edited layer are kept: that layer's keys run one
block, the top residual runs only the blocks from it up, and after the edit one block brings
the cache up to date. Rows end at the subject's last token, the only position read (causal
attention makes the tokens after it irrelevant).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..model_spec import ModelSpec, get_module
from ..requests import EditRequest
from ..tokens import locate
from ..tracing import forward_until, frozen_below, hidden_of, record_inputs
from .keys import pad_id_of, right_padded


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
    ) -> None:
        self.model, self.spec = model, spec
        self.blocks = get_module(model, spec.layers)
        device = next(model.parameters()).device
        located = [locate(tok, p, r.prompt, r.subject, None) for r in requests for p in prefixes]
        self.ids, self.mask = right_padded(
            [c.prompt_ids[: c.lookup + 1] for c in located], pad_id_of(tok), device
        )
        self.cols = torch.tensor([c.lookup for c in located], device=device)
        self.requests, self.contexts = len(requests), len(prefixes)
        self.bare = torch.arange(0, len(located), len(prefixes), device=device)
        self.below = -1  # the block whose output `hidden` holds; -1: none walked yet
        self.hidden: torch.Tensor | None = None
        self.example: Any = None  # one real block output: the structure stubs return

    @torch.no_grad()
    def keys(self, layer: int) -> torch.Tensor:
        """Prefix-averaged keys at `layer` [n, d_in]; `layer` must be above the walk."""
        path = self.spec.mlp_out_path(layer)
        rows = torch.arange(self.ids.shape[0], device=self.ids.device)
        with self._from_cache(rows), record_inputs(self.model, [path]) as seen:
            forward_until(
                self.model, path, input_ids=self.ids, attention_mask=self.mask, use_cache=False
            )
        keys = seen[path][rows, self.cols].float()
        return keys.view(self.requests, self.contexts, -1).mean(dim=1)

    @torch.no_grad()
    def block_output(self, layer: int) -> torch.Tensor:
        """Output of block `layer` at each bare prompt's subject [n, d]."""
        out, _ = self._run_to(layer, self.bare)
        return out[torch.arange(len(self.bare), device=out.device), self.cols[self.bare]].float()

    @torch.no_grad()
    def advance(self, layer: int) -> None:
        """Walk past block `layer` (on the current weights, after its edit)."""
        rows = torch.arange(self.ids.shape[0], device=self.ids.device)
        self.hidden, self.example = self._run_to(layer, rows)
        self.below = layer

    def _run_to(self, layer: int, rows: torch.Tensor) -> tuple[torch.Tensor, Any]:
        captured: dict[str, Any] = {}
        block = self.blocks[layer]
        handle = block.register_forward_hook(lambda _m, _a, out: captured.setdefault("out", out))
        try:
            with self._from_cache(rows):
                forward_until(
                    self.model,
                    self.spec.layer_path(layer),
                    input_ids=self.ids[rows],
                    attention_mask=self.mask[rows],
                    use_cache=False,
                )
        finally:
            handle.remove()
        return hidden_of(captured["out"]).detach(), captured["out"]

    @contextmanager
    def _from_cache(self, rows: torch.Tensor) -> Iterator[None]:
        if self.hidden is None:
            yield
            return
        hidden = self.hidden[rows]
        with frozen_below(self.blocks, self.below, lambda: hidden, self.example):
            yield
