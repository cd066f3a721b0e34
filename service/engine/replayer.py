"""The replayer: brings the served weights to a recorded version and follows the head.

Start-up replays the chain from the base, checking every version's checksum. Later moves
apply only what differs: a head that extends the current chain gets just its new patches;
any other target (a rollback, a rebase) recomputes only the parameters that the differing
patches touch. Every blob is read before the weights change, and the result is checked
against the recorded checksum, so a failed move leaves the weights at the last good version.
A replayer belongs to one copy of the weights (the served ones, or the writer's working
copy) and is used from that copy's thread only; the patch cache may be shared.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

from editors.patch import Patch
from editors.weight_state import WeightState

from ..ledger.blobs import BlobStore
from ..ledger.schema import Version
from ..ledger.store import Ledger

log = logging.getLogger(__name__)

PATCH_CACHE_SIZE = 4096


class IntegrityError(RuntimeError):
    """Restored weights do not hash to the checksum the ledger recorded."""


@dataclass(frozen=True)
class Move:
    """A version's chain and patches, read ahead of applying them."""

    target: list[Version]
    patches: dict[str, Patch]

    @property
    def number(self) -> int:
        return self.target[-1].number


class PatchCache:
    """Patches by sha256, most recently used last; shared by the replayers of one process
    (so a patch read or computed once is not read again), hence the lock."""

    def __init__(self, blobs: BlobStore, size: int = PATCH_CACHE_SIZE) -> None:
        self.blobs, self.size = blobs, size
        self._patches: OrderedDict[str, Patch] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, sha256: str) -> Patch:
        with self._lock:
            patch = self._patches.get(sha256)
            if patch is not None:
                self._patches.move_to_end(sha256)
                return patch
        patch = Patch.from_bytes(self.blobs.get(sha256), expected_sha256=sha256)
        self.remember(sha256, patch)
        return patch

    def cached(self, sha256: str) -> Patch | None:
        with self._lock:
            return self._patches.get(sha256)

    def remember(self, sha256: str, patch: Patch) -> None:
        with self._lock:
            self._patches[sha256] = patch
            if len(self._patches) > self.size:
                self._patches.popitem(last=False)


class Replayer:
    def __init__(
        self,
        weights: WeightState,
        ledger: Ledger,
        blobs: BlobStore,
        patches: PatchCache | None = None,
    ) -> None:
        self.weights, self.ledger, self.blobs = weights, ledger, blobs
        self._chain: list[Version] = []
        self.served_since = 0.0  # wall-clock time the version took effect here
        self.patches = patches if patches is not None else PatchCache(blobs)

    @property
    def chain(self) -> list[Version]:
        """The versions whose patches make the served weights, base first."""
        return self._chain

    @chain.setter
    def chain(self, chain: list[Version]) -> None:
        if not self._chain or not chain or chain[-1].number != self._chain[-1].number:
            self.served_since = time.time()
        self._chain = chain

    @property
    def version(self) -> int:
        return self.chain[-1].number if self.chain else -1

    @property
    def checksum(self) -> str:
        return self.chain[-1].checksum if self.chain else ""

    def patch(self, sha256: str) -> Patch:
        return self.patches.get(sha256)

    def cached(self, sha256: str) -> Patch | None:
        """The patch if it is in memory (a read that any thread may make)."""
        return self.patches.cached(sha256)

    def remember(self, sha256: str, patch: Patch) -> None:
        self.patches.remember(sha256, patch)

    def replay(self, chain: list[Version], check_each: bool = True) -> None:
        """Restore `chain` from the base, checking each version's checksum on the way (or
        only the last one's: a copy replayed after another already checked each)."""
        self.weights.restore([])
        for index, version in enumerate(chain):
            if version.patch_sha256:
                self.weights.apply(self.patch(version.patch_sha256))
            if not check_each and index < len(chain) - 1:
                continue
            checksum = self.weights.checksum()
            if checksum != version.checksum:
                raise IntegrityError(
                    f"replayed weights of version {version.number} hash to {checksum[:12]}, "
                    f"the ledger recorded {version.checksum[:12]}"
                )
        self.chain = chain

    def prepare(self, number: int) -> Move:
        """Everything moving to `number` needs to read (its chain and every blob), read
        now, from any thread, so that `apply` does no I/O on the thread that serves."""
        target = self.ledger.chain(number)
        return Move(
            target, {v.patch_sha256: self.patch(v.patch_sha256) for v in target if v.patch_sha256}
        )

    def apply(self, move: Move) -> Version:
        """Weights of the prepared version, checked against its recorded checksum."""
        target = move.target
        shared = _shared_prefix(self.chain, target)

        def patch(sha256: str) -> Patch:
            known = move.patches.get(sha256)
            return known if known is not None else self.patch(sha256)

        undo = self.weights.snapshot()
        try:
            if shared == len(self.chain):  # the target extends what is served: add the new
                for version in target[shared:]:
                    if version.patch_sha256:
                        self.weights.apply(patch(version.patch_sha256))
            else:  # recompute what the patches off the shared part touch, nothing else
                differing = [
                    patch(v.patch_sha256)
                    for v in [*self.chain[shared:], *target[shared:]]
                    if v.patch_sha256
                ]
                touched = {name for p in differing for name in p.parameter_names}
                ordered = [patch(v.patch_sha256) for v in target if v.patch_sha256]
                self.weights.restore(ordered, only=touched)
            checksum = self.weights.checksum()
            if checksum != target[-1].checksum:
                raise IntegrityError(
                    f"restored weights of version {target[-1].number} hash to "
                    f"{checksum[:12]}, the ledger recorded {target[-1].checksum[:12]}"
                )
        except BaseException:
            self.weights.reset_to(undo)
            raise
        self.chain = target
        return target[-1]

    def move_to(self, number: int) -> Version:
        """Weights of version `number`, checked against its recorded checksum."""
        return self.apply(self.prepare(number))

    def follow(self) -> bool:
        """Move to the ledger head if it is elsewhere; whether the weights moved."""
        head = self.ledger.head()
        if head.number == self.version:
            return False
        self.move_to(head.number)
        return True

    def committed(self, version: Version) -> None:
        """The weights now hold `version`, which this process just recorded."""
        if self.chain and version.parent == self.version:
            self.chain = [*self.chain, version]
        else:
            self.chain = self.ledger.chain(version.number)

    def history(self) -> list[Patch]:
        """The patches in effect at the current version, oldest first: the chain's, less
        those a subtract revert took back (a method's state, such as AlphaEdit's earlier
        keys, is read from them, so a rollback restores it with the weights)."""
        taken_back = {v.reverts for v in self.chain if v.reverts is not None}
        return [
            self.patch(v.patch_sha256)
            for v in self.chain
            if v.patch_sha256 and v.reverts is None and v.number not in taken_back
        ]


def _shared_prefix(current: list[Version], target: list[Version]) -> int:
    shared = 0
    for mine, theirs in zip(current, target, strict=False):
        if mine.number != theirs.number:
            break
        shared += 1
    return shared
