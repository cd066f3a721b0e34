"""Weights as base + patches, kept exact with fp32 master copies: the one way a patch is
applied to weights that are served, replayed or evaluated, so all three are the same bytes
(`apply_patch` in patch.py is the methods' own try-and-take-back while computing).

Only matrices a patch has touched are tracked: their base values are kept, and an fp32
master holds base + the applied deltas; the served parameter is the master cast to the
serving dtype. Restoring a version recomputes the masters from the base in ledger order,
so the weights (and their checksum) are a pure function of the patch sequence.
Codebook entries (GRACE) are state of the same kind: the codebook of each module is the
concatenation of the entries of the applied patches, rebuilt on restore, and part of the
checksum once any module has one. Added neurons (T-Patcher, CaliNet) are kept the same way:
each MLP's neurons are those of the applied patches, concatenated in order. IKE memory
entries (editors/memory.py) too: the model's memory is the applied patches' entries in order.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import torch
from torch import nn

from .codebook import Codebook, set_codebook
from .memory import MemoryEntry, entries_to_bytes, set_memory
from .neurons import AddedNeurons, neuron_module, set_neurons
from .patch import Delta, FactoredDelta, Patch, PatchError, codebook_module, dense_of


def tensor_digest(tensor: torch.Tensor) -> bytes:
    raw = tensor.detach().contiguous().view(-1).view(torch.uint8).cpu().numpy()
    return hashlib.sha256(memoryview(raw)).digest()


class WeightState:
    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.params: dict[str, nn.Parameter] = dict(model.named_parameters())
        self._base: dict[str, torch.Tensor] = {}
        self._master: dict[str, torch.Tensor] = {}
        self._digests: dict[str, bytes] | None = None  # per parameter, hashed on first use
        self._codebooks: dict[str, Codebook] = {}
        self._neurons: dict[str, AddedNeurons] = {}
        self._memories: tuple[MemoryEntry, ...] = ()

    @property
    def tracked(self) -> list[str]:
        return sorted(self._master)

    def checksum(self) -> str:
        """sha256 over every parameter's name and bytes, as served (device-independent)."""
        if self._digests is None:
            self._digests = {name: tensor_digest(p) for name, p in self.params.items()}
        total = hashlib.sha256()
        for name in sorted(self._digests):
            total.update(name.encode())
            total.update(self._digests[name])
        for path in sorted(self._codebooks):  # absent until a codebook edit: old sums hold
            book = self._codebooks[path]
            total.update(f"codebook:{path}".encode())
            for tensor in (book.keys, book.values, book.radii):
                total.update(tensor_digest(tensor.float()))
        for path in sorted(self._neurons):  # absent until an edit adds neurons
            added = self._neurons[path]
            total.update(f"neurons:{path}".encode())
            for tensor in added.tensors().values():
                total.update(tensor_digest(tensor))
        if self._memories:  # absent until an IKE edit
            total.update(b"memory:")
            total.update(hashlib.sha256(entries_to_bytes(self._memories)).digest())
        return total.hexdigest()

    def _track(self, name: str) -> torch.Tensor:
        if name not in self._master:
            param = self.params.get(name)
            if param is None:
                raise PatchError(f"model has no parameter {name!r}", field="patch")
            self._base[name] = param.detach().clone()
            self._master[name] = param.detach().float().clone()
        return self._master[name]

    def _publish(self, name: str) -> None:
        param = self.params[name]
        param.data.copy_(self._master[name].to(param.dtype))
        if self._digests is not None:
            self._digests[name] = tensor_digest(param)

    def check_fits(self, patch: Patch) -> None:
        for path, book in patch.codebooks.items():
            codebook_module(self.model, path, book)
        for path, added in patch.neurons.items():
            neuron_module(self.model, path, added)
        for name, delta in patch.deltas.items():
            param = self.params.get(name)
            if param is None:
                raise PatchError(f"model has no parameter {name!r}", field="patch")
            shape = dense_shape(delta)
            if shape != tuple(param.shape):
                raise PatchError(
                    f"delta for {name} has shape {shape}, parameter is {tuple(param.shape)}",
                    field="patch",
                )

    @property
    def codebooks(self) -> dict[str, Codebook]:
        """The codebook of each module that has one, as served."""
        return dict(self._codebooks)

    @property
    def neurons(self) -> dict[str, AddedNeurons]:
        """The added neurons of each MLP that has some, as served."""
        return dict(self._neurons)

    @property
    def memories(self) -> tuple[MemoryEntry, ...]:
        """The IKE memory entries, as served."""
        return self._memories

    def _add_entries(self, patch: Patch) -> None:
        for path, keys in patch.rekeys.items():
            self._codebooks[path] = self._codebooks[path].rekeyed(keys)
        for path, book in patch.codebooks.items():
            mine = self._codebooks.get(path)
            self._codebooks[path] = mine.extended(book) if mine is not None else book
        for path, added in patch.neurons.items():
            had = self._neurons.get(path)
            self._neurons[path] = had.extended(added) if had is not None else added
        if patch.memories:
            self._memories = (*self._memories, *patch.memories)

    def _publish_codebooks(self, paths: set[str]) -> None:
        for path in paths:
            set_codebook(self.model.get_submodule(path), self._codebooks.get(path))

    def _publish_neurons(self, paths: set[str]) -> None:
        for path in paths:
            set_neurons(self.model.get_submodule(path), self._neurons.get(path))

    def _publish_memory(self) -> None:
        set_memory(self.model, self._memories)  # unchanged entries: nothing happens

    @torch.no_grad()
    def apply(self, patch: Patch) -> None:
        self.check_fits(patch)
        for path, keys in patch.rekeys.items():
            book = self._codebooks.get(path)
            if book is None or tuple(keys.shape) != tuple(book.keys.shape):
                raise PatchError(f"new keys for {path} do not fit its codebook", field="patch")
        for name in patch.parameter_names:
            master = self._track(name)
            master += dense_of(patch.deltas[name]).to(master.device)
            self._publish(name)
        self._add_entries(patch)
        self._publish_codebooks(set(patch.codebooks) | set(patch.rekeys))
        self._publish_neurons(set(patch.neurons))
        if patch.memories:
            self._publish_memory()

    @torch.no_grad()
    def restore(self, patches: list[Patch], only: set[str] | None = None) -> None:
        """Weights = base + `patches` in order (exact: same sequence, same bytes). With
        `only`, just those parameters are recomputed: the caller knows the others already
        hold this sum (they are touched by no patch that differs)."""
        for patch in patches:
            self.check_fits(patch)
        redo = set(self._master) if only is None else set(only)
        for name in redo & set(self._master):
            self._master[name] = self._base[name].float().clone()
        touched = set(self._codebooks)
        self._codebooks = {}
        had_neurons = set(self._neurons)
        self._neurons = {}
        self._memories = ()
        for patch in patches:
            for name in patch.parameter_names:
                if name in redo:
                    master = self._track(name)
                    master += dense_of(patch.deltas[name]).to(master.device)
            self._add_entries(patch)
        for name in redo & set(self._master):
            self._publish(name)
        self._publish_codebooks(touched | set(self._codebooks))
        self._publish_neurons(had_neurons | set(self._neurons))
        self._publish_memory()

    def drift(self, names: list[str]) -> float:
        """Largest |W - W_base|_F / |W_base|_F over `names`: how far all the edits together
        moved those matrices."""
        ratios = [
            float(torch.linalg.norm(self._master[n] - self._base[n].float()))
            / max(float(torch.linalg.norm(self._base[n].float())), 1e-12)
            for n in names
            if n in self._master
        ]
        return max(ratios, default=0.0)

    def snapshot(self) -> WeightSnapshot:
        masters = {name: master.clone() for name, master in self._master.items()}
        return WeightSnapshot(masters, dict(self._codebooks), dict(self._neurons), self._memories)

    @torch.no_grad()
    def reset_to(self, snapshot: WeightSnapshot) -> None:
        """Undo to a snapshot (used when a version could not be recorded)."""
        for name in list(self._master):
            self._master[name] = (
                snapshot.masters[name].clone()
                if name in snapshot.masters
                else self._base[name].float().clone()
            )
            self._publish(name)
        touched = set(self._codebooks) | set(snapshot.codebooks)
        self._codebooks = dict(snapshot.codebooks)
        self._publish_codebooks(touched)
        had_neurons = set(self._neurons) | set(snapshot.neurons)
        self._neurons = dict(snapshot.neurons)
        self._publish_neurons(had_neurons)
        self._memories = snapshot.memories
        self._publish_memory()


@dataclass(frozen=True)
class WeightSnapshot:
    masters: dict[str, torch.Tensor]  # fp32 masters of the tracked parameters
    codebooks: dict[str, Codebook]  # codebooks are never changed in place: no copy needed
    neurons: dict[str, AddedNeurons] = field(default_factory=dict)  # nor are added neurons
    memories: tuple[MemoryEntry, ...] = ()  # IKE memory entries (immutable)


def dense_shape(delta: Delta) -> tuple[int, ...]:
    if isinstance(delta, FactoredDelta):
        return (int(delta.left.shape[0]), int(delta.right.shape[0]))
    return tuple(delta.shape)
