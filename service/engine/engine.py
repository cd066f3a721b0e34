"""The engine: the model runner, the replayer and the job runner of one process, and its
start-up (hash the base, prepare statistics, replay the ledger to its head).

- `ModelRunner` (model_runner.py) owns the served weights and the lane: generation,
  evaluation reads, the compute of edits.
- `Replayer` (replayer.py) restores versions and follows the head, applying only what changed.
- `JobRunner` (job_runner.py) runs one claimed job with a handler per kind.
Who may run jobs is decided by the writer lease (lease.py), held by the worker (worker.py).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import torch
from sqlalchemy.exc import SQLAlchemyError
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from editors.editor import Editor, corpus_statistics
from editors.errors import PatchError
from editors.requests import EditRequest

from ..ledger.blobs import BlobError, BlobStore
from ..ledger.store import Ledger, live_edits
from ..observability import ServiceMetrics
from .batcher import GenerationBatcher
from .generation import GenerationOutput, GenerationRequest
from .guard import EditGuard, GuardLimits
from .job_runner import GuardRejectedError, JobRejectedError, JobRunner
from .lane import ModelLane
from .model_runner import ModelRunner, RunnerState
from .replayer import IntegrityError, Replayer

log = logging.getLogger(__name__)

__all__ = ["Engine", "GuardRejectedError", "IntegrityError", "JobRejectedError"]


class Engine:
    def __init__(
        self,
        model: PreTrainedModel,
        tok: PreTrainedTokenizerBase,
        ledger: Ledger,
        blobs: BlobStore,
        stats_dir: str,
        stats_corpus: str | None = None,
        stats_samples: int = 20_000,
        generate_max_batch: int = 32,
        generate_wait_seconds: float = 0.02,
        metrics: ServiceMetrics | None = None,
        precompute_statistics: bool = True,
        max_job_attempts: int = 3,
        guard: GuardLimits | None = None,
        announce: Callable[[int], None] = lambda number: None,
        identity: str = "editserve",
    ) -> None:
        self.ledger, self.blobs, self.metrics = ledger, blobs, metrics
        self.runner = ModelRunner(model, tok, generate_max_batch, generate_wait_seconds)
        self.replayer = Replayer(self.runner.weights, ledger, blobs)
        self.runner.version = lambda: self.replayer.version
        self.runner.before_read = self._catch_up
        self.guard = (
            EditGuard(model, tok, guard, self.runner.on_base)
            if guard is not None and guard.enabled
            else None
        )
        self.jobs = JobRunner(
            self.runner,
            self.replayer,
            ledger,
            blobs,
            self.guard,
            metrics,
            max_job_attempts,
            announce,
            identity,
        )
        self.state = RunnerState()
        self.follow_error: str | None = None  # why the last catch-up failed (None: it did not)
        self._stats_args = (stats_dir, stats_corpus, stats_samples)
        self._precompute_statistics = precompute_statistics

    # -- what the routes read -----------------------------------------------------------------

    @property
    def model(self) -> PreTrainedModel:
        return self.runner.model

    @property
    def tok(self) -> PreTrainedTokenizerBase:
        return self.runner.tok

    @property
    def lane(self) -> ModelLane:
        return self.runner.lane

    @property
    def batcher(self) -> GenerationBatcher:
        return self.runner.batcher

    @property
    def editor(self) -> Editor:
        return self.runner.editor

    @property
    def version(self) -> int:
        return self.replayer.version

    @property
    def checksum(self) -> str:
        return self.replayer.checksum

    def fixed_codebook_edits(self) -> list[str]:
        """Live edits whose codebook entries were recorded without their contexts (before
        EditServe kept them): their keys cannot be read again, so a later change of the
        weights would leave them behind. Empty at once when every served entry has them."""
        if all(book.contexts is not None for book in self.runner.weights.codebooks.values()):
            return []
        chain = self.replayer.chain
        live = live_edits(chain)
        fixed = []
        for version in chain:
            patch = self.replayer.cached(version.patch_sha256) if version.patch_sha256 else None
            if patch is not None and any(b.contexts is None for b in patch.codebooks.values()):
                fixed += [edit_id for edit_id in version.edit_ids if edit_id in live]
        return fixed

    def edited_parameters(self) -> list[str]:
        """Names of the parameters any applied patch has touched since start-up."""
        return self.runner.weights.tracked

    # -- start-up -----------------------------------------------------------------------------

    def start(self) -> None:
        """Hash the base, record or check it, replay the ledger to its head; then ready."""
        try:
            self.lane.call(self._start_on_lane)
            self.state.ready, self.state.stage = True, "ready"
            log.info("ready at version %s (checksum %s)", self.version, self.checksum[:12])
        except Exception as exc:
            log.exception("engine start-up failed")
            self.state.stage, self.state.error = "failed", f"{type(exc).__name__}: {exc}"
            raise

    def _start_on_lane(self) -> None:
        began = time.perf_counter()
        self._stage("hashing the base weights")
        self.ledger.ensure_base(self.runner.weights.checksum())
        self.state.seconds["hash_base"] = time.perf_counter() - began
        began = time.perf_counter()
        self._stage("statistics")
        stats_dir, corpus, samples = self._stats_args
        self.runner.set_statistics(
            corpus_statistics(self.model, self.tok, stats_dir, corpus, samples)
        )
        if self._precompute_statistics:
            self.runner.ensure_statistics(self.runner.default_statistics_layers(), self._report)
        self.state.seconds["statistics_setup"] = time.perf_counter() - began
        began = time.perf_counter()
        head = self.ledger.head()
        self._stage(f"replaying the ledger to version {head.number}")
        self.replayer.replay(self.ledger.chain(head.number))
        self.state.seconds["replay"] = time.perf_counter() - began

    def _stage(self, stage: str) -> None:
        self.state.stage = stage
        log.info("start-up: %s", stage)

    def _report(self, fraction: float, stage: str) -> None:
        self.state.stage = f"statistics: {stage} ({100 * fraction:.0f} %)"

    def close(self) -> None:
        self.runner.close()

    # -- following the head -------------------------------------------------------------------

    def _catch_up(self) -> None:
        """Bring the weights to the ledger head (on the lane). A head that cannot be
        reached (a blob unreadable, the database away) leaves the weights at the last good
        version; `follow_error` says why until a later catch-up succeeds."""
        try:
            moved = self.replayer.follow()
        except (BlobError, IntegrityError, PatchError, SQLAlchemyError) as exc:
            error = f"{type(exc).__name__}: {exc}"
            if error != self.follow_error:
                log.warning("staying at version %s: %s", self.version, error)
            self.follow_error = error
            return
        self.follow_error = None
        if moved:
            log.info("following: now at version %s", self.version)

    async def sync(self) -> None:
        """Bring the weights to the ledger head (a no-op for the writer, which is there)."""
        await self.lane.run(self._catch_up)

    def follow(self) -> None:
        self.lane.call(self._catch_up)

    # -- reads and jobs -----------------------------------------------------------------------

    def sandbox(self, method: str, overrides: dict[str, Any], at_head: bool = False) -> Editor:
        return self.runner.sandbox(method, overrides, at_head)

    async def evaluate(
        self, requests: list[EditRequest], baseline: bool
    ) -> tuple[int, dict[str, float | None], dict[str, float | None] | None]:
        return await self.runner.evaluate(requests, baseline)

    async def generate(self, request: GenerationRequest) -> GenerationOutput:
        return await self.runner.generate(request)

    def run_job(self, job_id: int, fence: int | None = None) -> None:
        self.jobs.run_job(job_id, fence)


def torch_dtype(name: str, device: str) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def resolve_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name
