"""The replayer: brings the served weights to a recorded version and follows the head.

Start-up replays the chain from the base, checking every version's checksum. Later moves
apply only what differs: a head that extends the current chain gets just its new patches;
any other target (a rollback, a rebase) recomputes only the parameters that the differing
patches touch. Every blob is read before the weights change, and the result is checked
against the recorded checksum, so a failed move leaves the weights at the last good version.
Every method runs on the model lane.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict

from editors.patch import Patch
from editors.weight_state import WeightState

from ..ledger.blobs import BlobStore
from ..ledger.schema import Version
from ..ledger.store import Ledger

log = logging.getLogger(__name__)

PATCH_CACHE_SIZE = 4096


class IntegrityError(RuntimeError):
    """Restored weights do not hash to the checksum the ledger recorded."""


class Replayer:
    def __init__(self, weights: WeightState, ledger: Ledger, blobs: BlobStore) -> None:
        self.weights, self.ledger, self.blobs = weights, ledger, blobs
        self._chain: list[Version] = []
        self.served_since = 0.0  # wall-clock time the served version took effect here
        self._patches: OrderedDict[str, Patch] = OrderedDict()

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
        patch = self._patches.get(sha256)
        if patch is None:
            patch = Patch.from_bytes(self.blobs.get(sha256), expected_sha256=sha256)
            self.remember(sha256, patch)
        else:
            self._patches.move_to_end(sha256)
        return patch

    def cached(self, sha256: str) -> Patch | None:
        """The patch if it is in memory (a read that any thread may make)."""
        return self._patches.get(sha256)

    def remember(self, sha256: str, patch: Patch) -> None:
        self._patches[sha256] = patch
        if len(self._patches) > PATCH_CACHE_SIZE:
            self._patches.popitem(last=False)

    def replay(self, chain: list[Version]) -> None:
        """Restore `chain` from the base, checking each version's checksum on the way."""
        self.weights.restore([])
        for version in chain:
            if version.patch_sha256:
                self.weights.apply(self.patch(version.patch_sha256))
            checksum = self.weights.checksum()
            if checksum != version.checksum:
                raise IntegrityError(
                    f"replayed weights of version {version.number} hash to {checksum[:12]}, "
                    f"the ledger recorded {version.checksum[:12]}"
                )
        self.chain = chain

    def move_to(self, number: int) -> Version:
        """Weights of version `number`, checked against its recorded checksum."""
        target = self.ledger.chain(number)
        shared = _shared_prefix(self.chain, target)
        patches = [self.patch(v.patch_sha256) for v in target if v.patch_sha256]  # reads first
        undo = self.weights.snapshot()
        try:
            if shared == len(self.chain):  # the target extends what is served: add the new
                for version in target[shared:]:
                    if version.patch_sha256:
                        self.weights.apply(self.patch(version.patch_sha256))
            else:  # recompute what the patches off the shared part touch, nothing else
                differing = [
                    self.patch(v.patch_sha256)
                    for v in [*self.chain[shared:], *target[shared:]]
                    if v.patch_sha256
                ]
                touched = {name for patch in differing for name in patch.parameter_names}
                self.weights.restore(patches, only=touched)
            checksum = self.weights.checksum()
            if checksum != target[-1].checksum:
                raise IntegrityError(
                    f"restored weights of version {number} hash to {checksum[:12]}, "
                    f"the ledger recorded {target[-1].checksum[:12]}"
                )
        except BaseException:
            self.weights.reset_to(undo)
            raise
        self.chain = target
        return target[-1]

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
