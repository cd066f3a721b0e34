"""The engine: the model runner, the workspace, their replayers and the job runner of one
process, and its start-up (hash the base, prepare statistics, replay the ledger to its head).

- `ModelRunner` (model_runner.py) owns the served weights: generation, and the swap of a
  finished patch (the only exclusive step).
- `Workspace` (workspace.py) owns a second copy of the model where edits, guards,
  evaluations and rebases are computed, off the serving path.
- `Replayer` (replayer.py), one per copy, restores versions and follows the head, applying
  only what changed; the two share a patch cache.
- `JobRunner` (job_runner.py) runs one claimed job with a handler per kind on the
  workspace, records it, then has the served model move to the new version.
Who may run jobs is decided by the writer lease (lease.py), held by the worker (worker.py).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from copy import deepcopy
from typing import Any

import torch
from sqlalchemy.exc import SQLAlchemyError
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from editors.editor import Editor, corpus_statistics
from editors.errors import PatchError
from editors.memory import warm as warm_memory
from editors.requests import EditRequest

from ..ledger.blobs import BlobError, BlobStore
from ..ledger.store import Ledger, live_edits
from ..observability import ServiceMetrics
from .generation import GenerationOutput, GenerationRequest
from .guard import EditGuard, GuardLimits
from .job_runner import GuardRejectedError, JobRejectedError, JobRunner
from .model_runner import ModelRunner, RunnerState
from .replayer import IntegrityError, Move, PatchCache, Replayer
from .tokenizers import TokenizerPerThread
from .workspace import Workspace

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
        metrics: ServiceMetrics | None = None,
        precompute_statistics: bool = True,
        max_job_attempts: int = 3,
        job_time_limit_seconds: float | None = None,
        guard: GuardLimits | None = None,
        announce: Callable[[int], None] = lambda number: None,
        identity: str = "editserve",
    ) -> None:
        self.ledger, self.blobs, self.metrics = ledger, blobs, metrics
        self.tokenizers = TokenizerPerThread(tok)
        log.info("start-up: copying the model for the edit workspace")
        self.workspace = Workspace(deepcopy(model), self.tokenizers.copy())
        self.runner = ModelRunner(
            model,
            self.tokenizers.copy(),
            generate_max_batch,
            metrics.decoded_tokens.inc if metrics is not None else lambda count: None,
        )
        patches = PatchCache(blobs)
        self.replayer = Replayer(self.runner.weights, ledger, blobs, patches)
        self.work_replayer = Replayer(self.workspace.weights, ledger, blobs, patches)
        self.runner.version = lambda: self.replayer.version
        self._follow_lock = threading.Lock()
        self._served = threading.Condition()
        self.workspace.version = lambda: self.work_replayer.version
        self.workspace.catch_up = self._catch_up_workspace
        self.workspace.move_to = self.work_replayer.move_to
        self.guard = (
            EditGuard(self.workspace.model, self.workspace.tok, guard, self.workspace.on_base)
            if guard is not None and guard.enabled
            else None
        )
        self.jobs = JobRunner(
            self.workspace,
            self.work_replayer,
            ledger,
            blobs,
            self.guard,
            metrics,
            max_job_attempts,
            announce,
            identity,
            publish=self.publish,
            time_limit_seconds=job_time_limit_seconds,
        )
        self.state = RunnerState()
        self.follow_error: str | None = None  # why the last catch-up failed (None: it did not)
        self._stats_args = (stats_dir, stats_corpus, stats_samples)
        self._precompute_statistics = precompute_statistics
        self._logged_progress = ("", 0)  # the stage and tenth of the last progress logged

    # -- what the routes read -----------------------------------------------------------------

    @property
    def model(self) -> PreTrainedModel:
        return self.runner.model

    @property
    def tok(self) -> PreTrainedTokenizerBase:
        """The calling thread's own tokenizer."""
        return self.tokenizers.get()

    @property
    def editor(self) -> Editor:
        """The workspace's editor (hyperparameters, model spec; computes on the workspace)."""
        return self.workspace.editor

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
            self.workspace.lane.call(self._start_on_lanes)
            self.state.ready, self.state.stage = True, "ready"
            log.info("ready at version %s (checksum %s)", self.version, self.checksum[:12])
        except Exception as exc:
            log.exception("engine start-up failed")
            self.state.stage, self.state.error = "failed", f"{type(exc).__name__}: {exc}"
            raise

    def _start_on_lanes(self) -> None:
        """On the workspace lane; the served model's replay runs on its own thread."""
        workspace = self.workspace
        began = time.perf_counter()
        self._stage("hashing the base weights")
        self.ledger.ensure_base(workspace.weights.checksum())
        self.state.seconds["hash_base"] = time.perf_counter() - began
        began = time.perf_counter()
        self._stage("statistics")
        stats_dir, corpus, samples = self._stats_args
        workspace.set_statistics(
            corpus_statistics(workspace.model, workspace.tok, stats_dir, corpus, samples)
        )
        if self._precompute_statistics:
            workspace.ensure_statistics(workspace.default_statistics_layers(), self._report)
        self.state.seconds["statistics_setup"] = time.perf_counter() - began
        began = time.perf_counter()
        head = self.ledger.head()
        chain = self.ledger.chain(head.number)
        self._stage(f"replaying the ledger to version {head.number}")
        self.runner.call(lambda: self.replayer.replay(chain))
        self.work_replayer.replay(chain, check_each=False)
        warm_memory(self.runner.model)  # IKE: embed the memory's keys before serving
        self.state.seconds["replay"] = time.perf_counter() - began

    def _stage(self, stage: str) -> None:
        self.state.stage = stage
        log.info("start-up: %s", stage)

    def _report(self, fraction: float, stage: str) -> None:
        self.state.stage = f"statistics: {stage} ({100 * fraction:.0f} %)"
        tenth = min(10, int(fraction * 10))
        last_stage, last_tenth = self._logged_progress
        if stage != last_stage or tenth > last_tenth:  # the log gets every 10 %
            self._logged_progress = (stage, tenth)
            log.info("start-up: %s, %s %%", stage, 10 * tenth)

    def close(self) -> None:
        self.runner.close()
        self.workspace.close()

    # -- following the head -------------------------------------------------------------------

    def follow(self, number: int | None = None) -> None:
        """Serve version `number` (default: the ledger head) if it is newer than the one
        served. The chain and blobs are read on the calling thread; only the swap runs on
        the serving thread, once the requests in flight have finished. A version that
        cannot be reached (a blob unreadable, the database away) leaves the weights at the
        last good version; `follow_error` says why until a later move succeeds."""
        with self._follow_lock:  # one move prepared at a time: no older one overtakes
            try:
                if number is None:
                    number = self.ledger.head().number
                if number <= self.replayer.version:
                    return
                move = self.replayer.prepare(number)
                moved = self.runner.call(lambda: self._swap(move))
            except (BlobError, IntegrityError, PatchError, SQLAlchemyError) as exc:
                error = f"{type(exc).__name__}: {exc}"
                if error != self.follow_error:
                    log.warning("staying at version %s: %s", self.version, error)
                self.follow_error = error
                return
        self.follow_error = None
        if moved:
            log.info("serving version %s", self.version)

    def _swap(self, move: Move) -> bool:
        """On the serving thread, nothing in flight: the only exclusive step of an edit."""
        if move.number <= self.replayer.version:  # versions only grow along the lineage
            return False
        began = time.perf_counter()
        self.replayer.apply(move)
        if self.metrics is not None:
            self.metrics.swap_seconds.observe(time.perf_counter() - began)
        with self._served:
            self._served.notify_all()
        return True

    def publish(self, number: int) -> None:
        """Serve version `number`, just recorded by this process."""
        self.follow(number)

    def wait_served(self, number: int, timeout: float) -> bool:
        """Block until the served weights are at `number` or later (False: timed out)."""
        deadline = time.monotonic() + timeout
        with self._served:
            while self.replayer.version < number:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._served.wait(left)
        return True

    def _catch_up_workspace(self) -> None:
        """Bring the workspace to the ledger head (on the workspace lane); errors are the
        caller's (an evaluation or a job cannot go on from a stale copy)."""
        self.work_replayer.follow()

    # -- reads and jobs -----------------------------------------------------------------------

    def sandbox(self, method: str, overrides: dict[str, Any], at_head: bool = False) -> Editor:
        return self.workspace.sandbox(method, overrides, at_head)

    async def evaluate(
        self, requests: list[EditRequest], baseline: bool
    ) -> tuple[int, dict[str, float | None], dict[str, float | None] | None]:
        return await self.workspace.evaluate(requests, baseline)

    async def generate(self, request: GenerationRequest) -> GenerationOutput:
        return await self.runner.generate(request)

    async def generate_at(
        self, number: int, requests: list[GenerationRequest]
    ) -> list[GenerationOutput]:
        """Text from recorded version `number`, computed on the workspace (not served)."""
        return await self.workspace.generate_at(number, requests)

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
