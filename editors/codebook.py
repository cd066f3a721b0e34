"""GRACE's codebook adaptor: keys, values and radii held beside one module of the model.

At every position, the module's input x is compared with the codebook keys; if the nearest
key k_j lies within its radius (|x - k_j| <= r_j) the module's output there is replaced by
the value v_j, otherwise it passes unchanged. No weight changes: the entries are the whole
edit. They live on the module as plain state read by one forward hook, so a deep copy of the
model carries them, and applying or reverting a patch only swaps the module's codebook.

Each entry also keeps its context: the tokens whose last position produced its key. A later
change of the weights below the module moves the inputs there; `fresh_keys` reads the keys
again from the contexts on the changed model, so the entries still fire where they should.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

_ATTRIBUTE = "editserve_codebook"
_HOOKED = "editserve_codebook_hooked"


@dataclass(frozen=True)
class Codebook:
    keys: torch.Tensor  # [n, d_in] module inputs that trigger an entry
    values: torch.Tensor  # [n, d_out] the module outputs put there instead
    radii: torch.Tensor  # [n] how far from its key an input still triggers the entry
    # per entry, the token ids whose last position gave its key (None: not recorded)
    contexts: tuple[torch.Tensor, ...] | None = None

    def __post_init__(self) -> None:
        n = self.keys.shape[0]
        if self.keys.dim() != 2 or self.values.dim() != 2 or self.radii.shape != (n,):
            raise ValueError("a codebook needs keys [n, d_in], values [n, d_out], radii [n]")
        if self.values.shape[0] != n:
            raise ValueError("a codebook needs as many values as keys")
        if self.contexts is not None and len(self.contexts) != n:
            raise ValueError("a codebook needs one context per key, or none")

    def __len__(self) -> int:
        return int(self.keys.shape[0])

    def extended(self, more: Codebook) -> Codebook:
        contexts = (
            (*self.contexts, *more.contexts)
            if self.contexts is not None and more.contexts is not None
            else None
        )
        return Codebook(
            torch.cat([self.keys, more.keys.to(self.keys.device)]),
            torch.cat([self.values, more.values.to(self.values.device)]),
            torch.cat([self.radii, more.radii.to(self.radii.device)]),
            contexts,
        )

    def rekeyed(self, keys: torch.Tensor) -> Codebook:
        """The same entries with keys read again on changed weights."""
        if tuple(keys.shape) != tuple(self.keys.shape):
            raise ValueError(f"new keys {tuple(keys.shape)} for keys {tuple(self.keys.shape)}")
        return Codebook(keys.to(self.keys.device), self.values, self.radii, self.contexts)

    def to(self, device: torch.device | str) -> Codebook:
        return Codebook(
            self.keys.to(device), self.values.to(device), self.radii.to(device), self.contexts
        )

    @torch.no_grad()
    def lookup(self, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """For inputs [..., d_in]: whether an entry fires at each position, and which."""
        flat = inputs.reshape(-1, inputs.shape[-1]).float()
        distance = torch.cdist(flat, self.keys.float())  # [positions, n]
        nearest, index = distance.min(dim=1)
        fires = nearest <= self.radii.float()[index]
        return fires.view(inputs.shape[:-1]), index.view(inputs.shape[:-1])

    def replace(self, inputs: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        fires, index = self.lookup(inputs)
        if not bool(fires.any()):
            return output
        chosen = self.values[index].to(output.dtype)
        return torch.where(fires[..., None], chosen, output)


@torch.no_grad()
def fresh_keys(model: nn.Module, path: str, contexts: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """The input of the module at `path` at the last token of each context, on the model as
    it is now (codebooks included): [n, d_in]."""
    module = model.get_submodule(path)
    device = next(model.parameters()).device
    longest = max(len(c) for c in contexts)
    ids = torch.zeros(len(contexts), longest, dtype=torch.long, device=device)
    mask = torch.zeros_like(ids)
    for row, context in enumerate(contexts):  # right-padded: no real token sees the padding
        ids[row, : len(context)] = context.to(device)
        mask[row, : len(context)] = 1
    last = torch.tensor([len(c) - 1 for c in contexts], device=device)
    seen: dict[str, torch.Tensor] = {}

    def read(_m: nn.Module, args: tuple[Any, ...], _output: torch.Tensor) -> None:
        seen["keys"] = args[0][torch.arange(len(contexts), device=device), last].float()

    handle = module.register_forward_hook(read)
    try:
        model(input_ids=ids, attention_mask=mask, use_cache=False)
    finally:
        handle.remove()
    return seen["keys"].cpu()


def _codebook_hook(module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> Any:
    book: Codebook | None = getattr(module, _ATTRIBUTE, None)
    if book is None or len(book) == 0:
        return None
    return book.replace(args[0], output)


def codebook_of(module: nn.Module) -> Codebook | None:
    return getattr(module, _ATTRIBUTE, None)


def set_codebook(module: nn.Module, book: Codebook | None) -> None:
    """Give `module` this codebook (None: none); the hook is registered on first use."""
    if book is not None:
        weight = getattr(module, "weight", None)
        if weight is not None:
            book = book.to(weight.device)
        if not getattr(module, _HOOKED, False):
            module.register_forward_hook(_codebook_hook)
            setattr(module, _HOOKED, True)
    setattr(module, _ATTRIBUTE, book)


def io_dims(module: nn.Module) -> tuple[int, int] | None:
    """(d_in, d_out) of a linear module (GPT-2's Conv1D stores its weight as [in, out])."""
    weight = getattr(module, "weight", None)
    if weight is None or weight.dim() != 2:
        return None
    if isinstance(module, nn.Linear):
        return int(weight.shape[1]), int(weight.shape[0])
    return int(weight.shape[0]), int(weight.shape[1])
