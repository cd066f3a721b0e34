"""Patches: per-parameter weight deltas an editor returns and only the caller applies.

A delta is factored (`param += left @ right.T`, rank r) or dense. A patch serialises to
safetensors bytes (deterministic for the same content) named by their sha256. Applying
returns the original values of the touched parameters, so a revert is bit-exact.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn

from .codebook import Codebook, codebook_of, io_dims, set_codebook
from .errors import PatchError
from .memory import MemoryEntry, entries_from_bytes, entries_to_bytes, memory_entries, set_memory
from .neurons import AddedNeurons, neuron_module, neurons_of, set_neurons

_KEYS = "@keys.layer"  # tensor-name prefix of the stored keys (no parameter name has '@')
_CODEBOOK = "@codebook."  # tensor-name prefix of codebook entries, by module path
_REKEY = "@rekey."  # tensor-name prefix of codebook keys read again, by module path
_NEURONS = "@neurons."  # tensor-name prefix of added neurons, by MLP module path
_MEMORY = "@memory::entries"  # IKE memory entries, as JSON bytes (uint8)


@dataclass(frozen=True)
class FactoredDelta:
    left: torch.Tensor  # [rows, r]
    right: torch.Tensor  # [cols, r]

    def dense(self) -> torch.Tensor:
        return self.left.float() @ self.right.float().T

    @property
    def rank(self) -> int:
        return int(self.left.shape[1])


Delta = FactoredDelta | torch.Tensor


def dense_of(delta: Delta) -> torch.Tensor:
    return delta.dense() if isinstance(delta, FactoredDelta) else delta.float()


@dataclass
class Patch:
    """Deltas by parameter name; `keys` holds, per layer, the keys [d_in, n] the edit wrote
    there, for methods that protect earlier edits (AlphaEdit reads them from the history);
    `codebooks` holds codebook entries to add beside modules, by module path (GRACE);
    `rekeys` holds, by module path, new keys for all the entries a module had before this
    patch (read again on the weights this patch makes, see codebook.fresh_keys); they are
    put in before this patch's own entries are added; `neurons` holds key-value neurons to
    add beside MLP modules, by module path (editors/neurons.py: T-Patcher, CaliNet), after
    those the module has; `memories` holds IKE memory entries (editors/memory.py), added
    after those of the patches before it."""

    method: str
    deltas: dict[str, Delta]
    metadata: dict[str, str] = field(default_factory=dict)
    keys: dict[int, torch.Tensor] = field(default_factory=dict)
    codebooks: dict[str, Codebook] = field(default_factory=dict)
    rekeys: dict[str, torch.Tensor] = field(default_factory=dict)
    neurons: dict[str, AddedNeurons] = field(default_factory=dict)
    memories: tuple[MemoryEntry, ...] = ()

    @property
    def parameter_names(self) -> list[str]:
        return sorted(self.deltas)

    def to_bytes(self) -> bytes:
        tensors: dict[str, torch.Tensor] = {}
        for name, delta in self.deltas.items():
            if isinstance(delta, FactoredDelta):
                tensors[f"{name}::left"] = delta.left.float().contiguous()
                tensors[f"{name}::right"] = delta.right.float().contiguous()
            else:
                tensors[f"{name}::dense"] = delta.float().contiguous()
        for layer, keys in self.keys.items():
            tensors[f"{_KEYS}{layer}::keys"] = keys.float().contiguous()
        for path, book in self.codebooks.items():
            tensors[f"{_CODEBOOK}{path}::keys"] = book.keys.float().contiguous()
            tensors[f"{_CODEBOOK}{path}::values"] = book.values.float().contiguous()
            tensors[f"{_CODEBOOK}{path}::radii"] = book.radii.float().contiguous()
            if book.contexts is not None:
                tensors[f"{_CODEBOOK}{path}::context_ids"] = torch.cat(book.contexts).long()
                tensors[f"{_CODEBOOK}{path}::context_lengths"] = torch.tensor(
                    [len(c) for c in book.contexts], dtype=torch.long
                )
        for path, keys in self.rekeys.items():
            tensors[f"{_REKEY}{path}::keys"] = keys.float().contiguous()
        for path, added in self.neurons.items():
            for part, tensor in added.tensors().items():
                tensors[f"{_NEURONS}{path}::{part}"] = tensor
        if self.memories:
            raw = entries_to_bytes(self.memories)
            tensors[_MEMORY] = torch.frombuffer(bytearray(raw), dtype=torch.uint8).clone()
        # one metadata key: safetensors writes several in no fixed order, breaking the hash
        header = json.dumps({"method": self.method, "metadata": self.metadata}, sort_keys=True)
        return st_save(tensors, metadata={"editserve": header})

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.to_bytes()).hexdigest()

    @classmethod
    def from_bytes(cls, data: bytes, expected_sha256: str | None = None) -> Patch:
        if expected_sha256 is not None and hashlib.sha256(data).hexdigest() != expected_sha256:
            raise PatchError("patch bytes do not match their sha256", field="patch")
        try:
            tensors = st_load(data)
            meta = _read_metadata(data)
        except Exception as exc:  # safetensors raises several error types
            message = f"patch bytes are not valid safetensors: {exc}"
            raise PatchError(message, field="patch") from exc
        parts: dict[str, dict[str, torch.Tensor]] = {}
        memory = tensors.pop(_MEMORY, None)
        for key, tensor in tensors.items():
            name, _, part = key.rpartition("::")
            parts.setdefault(name, {})[part] = tensor
        try:
            codebooks = {
                name.removeprefix(_CODEBOOK): Codebook(
                    p["keys"], p["values"], p["radii"], _contexts(p)
                )
                for name, p in parts.items()
                if name.startswith(_CODEBOOK)
            }
            rekeys = {
                name.removeprefix(_REKEY): p["keys"]
                for name, p in parts.items()
                if name.startswith(_REKEY)
            }
            neurons = {
                name.removeprefix(_NEURONS): AddedNeurons.from_tensors(p)
                for name, p in parts.items()
                if name.startswith(_NEURONS)
            }
            keys = {
                int(name.removeprefix(_KEYS)): p["keys"]
                for name, p in parts.items()
                if name.startswith(_KEYS)
            }
            deltas: dict[str, Delta] = {
                name: FactoredDelta(p["left"], p["right"]) if "left" in p else p["dense"]
                for name, p in parts.items()
                if not name.startswith("@")
            }
            memories = (
                entries_from_bytes(bytes(memory.numpy().tobytes())) if memory is not None else ()
            )
        except (KeyError, ValueError, TypeError) as exc:
            raise PatchError(f"patch bytes hold an incomplete entry: {exc}", field="patch") from exc
        metadata = dict(meta.get("metadata", {}))
        return cls(
            meta.get("method", ""), deltas, metadata, keys, codebooks, rekeys, neurons, memories
        )

    def delta_norms(self) -> dict[str, float]:
        """Frobenius norm of each parameter's delta."""
        return {name: float(torch.linalg.norm(dense_of(d))) for name, d in self.deltas.items()}

    @property
    def subtractable(self) -> bool:
        """Whether adding `negated()` takes this patch back: weight deltas only (codebook
        entries, added neurons and memory entries are not sums, so they cannot be subtracted)."""
        return not self.codebooks and not self.neurons and not self.memories

    def negated(self) -> Patch:
        """The patch that subtracts this one's weight deltas (see `subtractable`)."""
        if not self.subtractable:
            what = (
                "codebook entries"
                if self.codebooks
                else "added neurons"
                if self.neurons
                else "memory entries"
            )
            raise PatchError(f"a {self.method} patch holds {what}", field="patch")
        deltas: dict[str, Delta] = {
            name: FactoredDelta(-d.left, d.right) if isinstance(d, FactoredDelta) else -d
            for name, d in self.deltas.items()
        }
        return Patch(self.method, deltas, {**self.metadata, "negated": "true"})

    def with_rekeys(self, rekeys: dict[str, torch.Tensor]) -> Patch:
        return Patch(
            self.method,
            self.deltas,
            self.metadata,
            self.keys,
            self.codebooks,
            rekeys,
            self.neurons,
            self.memories,
        )

    def merged(self, other: Patch) -> Patch:
        """One patch with both patches' deltas (factored deltas concatenate their ranks)."""
        if other.rekeys:
            raise PatchError("a patch that re-keys codebooks cannot be merged into another")
        deltas = dict(self.deltas)
        for name, delta in other.deltas.items():
            if name not in deltas:
                deltas[name] = delta
            elif isinstance(deltas[name], FactoredDelta) and isinstance(delta, FactoredDelta):
                mine = deltas[name]
                assert isinstance(mine, FactoredDelta)
                deltas[name] = FactoredDelta(
                    torch.cat([mine.left, delta.left], 1), torch.cat([mine.right, delta.right], 1)
                )
            else:
                deltas[name] = dense_of(deltas[name]) + dense_of(delta)
        keys = dict(self.keys)
        for layer, more in other.keys.items():
            keys[layer] = torch.cat([keys[layer], more], 1) if layer in keys else more
        books = dict(self.codebooks)
        for path, book in other.codebooks.items():
            books[path] = books[path].extended(book) if path in books else book
        neurons = dict(self.neurons)
        for path, added in other.neurons.items():
            neurons[path] = neurons[path].extended(added) if path in neurons else added
        metadata = {**self.metadata, **other.metadata}
        memories = (*self.memories, *other.memories)
        return Patch(
            self.method, deltas, metadata, keys, books, dict(self.rekeys), neurons, memories
        )


def _contexts(parts: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...] | None:
    if "context_ids" not in parts:
        return None  # entries recorded before contexts were kept
    lengths = [int(n) for n in parts["context_lengths"].tolist()]
    return tuple(torch.split(parts["context_ids"], lengths))


def _read_metadata(data: bytes) -> dict:
    header_len = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + header_len])
    return json.loads((header.get("__metadata__") or {}).get("editserve", "{}"))


@dataclass
class AppliedPatch:
    """Original values of the parameters a patch changed, and the codebooks and added
    neurons it replaced; `revert` restores them exactly."""

    originals: dict[str, torch.Tensor]
    codebooks: dict[str, Codebook | None] = field(default_factory=dict)
    neurons: dict[str, AddedNeurons | None] = field(default_factory=dict)
    memories: tuple[MemoryEntry, ...] | None = None  # the memory before (None: untouched)


def _parameter(model: nn.Module, name: str) -> nn.Parameter:
    try:
        return model.get_parameter(name)
    except AttributeError as exc:
        raise PatchError(f"model has no parameter {name!r}", field="patch") from exc


@torch.no_grad()
def apply_patch(model: nn.Module, patch: Patch) -> AppliedPatch:
    """Add the patch's deltas to the model (fp32 arithmetic, cast to the weight dtype)."""
    params = {name: _parameter(model, name) for name in patch.parameter_names}
    for name, param in params.items():
        delta = patch.deltas[name]
        shape = (
            (delta.left.shape[0], delta.right.shape[0])
            if isinstance(delta, FactoredDelta)
            else tuple(delta.shape)
        )
        if tuple(param.shape) != tuple(shape):
            raise PatchError(
                f"delta for {name} has shape {tuple(shape)}, parameter is {tuple(param.shape)}",
                field="patch",
            )
    modules = {path: codebook_module(model, path, book) for path, book in patch.codebooks.items()}
    rekeyed = {path: model.get_submodule(path) for path in patch.rekeys}
    mlps = {path: neuron_module(model, path, added) for path, added in patch.neurons.items()}
    originals = {name: param.detach().clone() for name, param in params.items()}
    for name, param in params.items():
        update = dense_of(patch.deltas[name]).to(param.device)
        param.copy_((param.float() + update).to(param.dtype))
    books: dict[str, Codebook | None] = {}
    for path, module in rekeyed.items():
        books[path] = before = codebook_of(module)
        if before is None:
            raise PatchError(f"new keys for {path}, which has no codebook", field="patch")
        set_codebook(module, before.rekeyed(patch.rekeys[path]))
    for path, module in modules.items():
        before = codebook_of(module)
        books.setdefault(path, before)
        added = patch.codebooks[path]
        set_codebook(module, before.extended(added) if before is not None else added)
    neurons: dict[str, AddedNeurons | None] = {}
    for path, module in mlps.items():
        neurons[path] = had = neurons_of(module)
        more = patch.neurons[path]
        set_neurons(module, had.extended(more) if had is not None else more)
    memories = None
    if patch.memories:
        memories = memory_entries(model)
        set_memory(model, (*memories, *patch.memories))
    return AppliedPatch(originals, books, neurons, memories)


@torch.no_grad()
def revert_patch(model: nn.Module, applied: AppliedPatch) -> None:
    for name, original in applied.originals.items():
        _parameter(model, name).copy_(original)
    for path, book in applied.codebooks.items():
        set_codebook(model.get_submodule(path), book)
    for path, had in applied.neurons.items():
        set_neurons(model.get_submodule(path), had)
    if applied.memories is not None:
        set_memory(model, applied.memories)


def codebook_module(model: nn.Module, path: str, book: Codebook) -> nn.Module:
    """The module at `path`, checked to take codebook entries of `book`'s sizes."""
    try:
        module = model.get_submodule(path)
    except AttributeError as exc:
        raise PatchError(f"model has no module {path!r}", field="patch") from exc
    dims = io_dims(module)
    wanted = (int(book.keys.shape[1]), int(book.values.shape[1]))
    if dims != wanted:
        raise PatchError(
            f"codebook for {path} maps {wanted[0]} -> {wanted[1]}, the module {dims}",
            field="patch",
        )
    return module
