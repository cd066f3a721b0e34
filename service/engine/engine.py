"""The engine: owns the resident model and carries out ledger jobs on its lane.

Start-up restores the ledger head (verifying every version's checksum on the way). Each job
runs its model work as one lane task: compute the patch, apply it, record the version; if
the record fails the weights go back, so the live model is always at a recorded version.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from copy import deepcopy
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
from sqlalchemy.exc import SQLAlchemyError
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from editors.editor import Editor, corpus_statistics
from editors.errors import EditError
from editors.methods import METHODS, get_method
from editors.metrics import evaluate, locality_reference
from editors.patch import FactoredDelta, Patch
from editors.requests import EditRequest
from editors.result import EditResult
from editors.stats import CorpusStatistics

from ..ledger.blobs import BlobStore
from ..ledger.schema import Job, JobKind, Status, Version, VersionKind
from ..ledger.store import Ledger, NewVersion, live_edits
from ..observability import ServiceMetrics, request_id
from ..requests import request_from_record
from .batcher import GenerationBatcher
from .generation import GenerationOutput, GenerationRequest, generate_batch
from .guard import EditGuard, GuardLimits, GuardReport
from .lane import ModelLane
from .progress import JobProgress
from .weights import WeightSnapshot, WeightState

log = logging.getLogger(__name__)

T = TypeVar("T")


class IntegrityError(RuntimeError):
    """Restored weights do not hash to the checksum the ledger recorded."""


class JobRejectedError(EditError):
    """The job cannot be carried out as asked (the reason names the field)."""


class GuardRejectedError(EditError):
    """The edit guard measured too much damage; the edit is not recorded."""

    def __init__(self, report: GuardReport) -> None:
        figures = ", ".join(f"{k} {v}" for k, v in report.figures.items())
        super().__init__(
            f"refused by the edit guard: {'; '.join(report.reasons)} ({figures})", field="guard"
        )
        self.report = report


@dataclass
class EngineState:
    ready: bool = False
    stage: str = "loading"
    error: str | None = None
    started_at: float = field(default_factory=time.monotonic)
    seconds: dict[str, float] = field(default_factory=dict)


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
    ) -> None:
        self.max_job_attempts = max_job_attempts
        self.guard = EditGuard(model, tok, guard) if guard is not None and guard.enabled else None
        self._precompute_statistics = precompute_statistics
        self.metrics = metrics
        self.model, self.tok, self.ledger, self.blobs = model, tok, ledger, blobs
        self.lane = ModelLane()
        self.state = EngineState()
        self.weights: WeightState | None = None
        self.version = -1
        self.checksum = ""
        self._stats_args = (stats_dir, stats_corpus, stats_samples)
        self._editor: Editor | None = None
        self._patches: OrderedDict[str, Patch] = OrderedDict()
        self._prefixes_on_base: dict[tuple[int, int, int], list[str]] = {}
        self.batcher = GenerationBatcher(
            self.lane, self._generate_on_lane, generate_max_batch, generate_wait_seconds
        )
        self._job_lock = threading.Lock()

    # -- start-up ---------------------------------------------------------------------------

    def start(self) -> None:
        """Hash the base, record or check it, replay the ledger to its head; then ready."""
        try:
            self.lane.call(self._start_on_lane)
            self.state.ready, self.state.stage = True, "ready"
        except Exception as exc:
            log.exception("engine start-up failed")
            self.state.stage, self.state.error = "failed", f"{type(exc).__name__}: {exc}"
            raise

    def _start_on_lane(self) -> None:
        began = time.perf_counter()
        self.state.stage = "hashing base weights"
        self.weights = WeightState(self.model)
        base_checksum = self.weights.checksum()
        self.ledger.ensure_base(base_checksum)
        self.state.seconds["hash_base"] = time.perf_counter() - began
        began = time.perf_counter()
        self.state.stage = "statistics"
        stats_dir, corpus, samples = self._stats_args
        stats = corpus_statistics(self.model, self.tok, stats_dir, corpus, samples)
        self._editor = Editor(self.model, self.tok, stats)
        if self._precompute_statistics:
            self._prepare_default_statistics()
        self.state.seconds["statistics_setup"] = time.perf_counter() - began
        began = time.perf_counter()
        self.state.stage = "replaying the ledger"
        head = self.ledger.head()
        self._replay(self.ledger.chain(head.number))
        self.state.seconds["replay"] = time.perf_counter() - began

    def _prepare_default_statistics(self) -> None:
        """Statistics of every layer a method edits by default, before the service is ready:
        computed once (minutes on a CPU) and cached, so no edit stalls the lane for them."""
        editor = self.editor
        layers = sorted({layer for name in METHODS for layer in editor.statistics_layers(name)})
        stats = editor.stats

        def report(fraction: float, stage: str) -> None:
            self.state.stage = f"statistics: {stage} ({100 * fraction:.0f} %)"

        if hasattr(stats, "progress"):
            stats.progress = report  # type: ignore[attr-defined]
        self._ensure_statistics(layers)

    def _replay(self, chain: list[Version]) -> None:
        """Restore `chain` from the base, checking each version's checksum on the way."""
        weights = self._weights()
        weights.restore([])
        for version in chain:
            if version.patch_sha256:
                weights.apply(self._patch(version.patch_sha256))
            checksum = weights.checksum()
            if checksum != version.checksum:
                raise IntegrityError(
                    f"replayed weights of version {version.number} hash to {checksum[:12]}, "
                    f"the ledger recorded {version.checksum[:12]}"
                )
        self.version, self.checksum = chain[-1].number, chain[-1].checksum

    @property
    def editor(self) -> Editor:
        if self._editor is None:
            raise RuntimeError("the engine has not started")
        return self._editor

    def _weights(self) -> WeightState:
        if self.weights is None:
            raise RuntimeError("the engine has not started")
        return self.weights

    async def sync(self) -> None:
        """Bring the weights to the ledger head (a no-op for the writer, which is there)."""
        await self.lane.run(self._follow_head)

    def edited_parameters(self) -> list[str]:
        """Names of the parameters any applied patch has touched since start-up."""
        return self._weights().tracked

    def close(self) -> None:
        self.lane.close()

    # -- lane helpers (run on the lane only) ------------------------------------------------

    def _patch(self, sha256: str) -> Patch:
        patch = self._patches.get(sha256)
        if patch is None:
            patch = Patch.from_bytes(self.blobs.get(sha256), expected_sha256=sha256)
            self._patches[sha256] = patch
            if len(self._patches) > 4096:
                self._patches.popitem(last=False)
        return patch

    def _restore(self, number: int) -> Version:
        """Weights of version `number`, checked against its recorded checksum."""
        chain = self.ledger.chain(number)
        weights = self._weights()
        undo = weights.snapshot()
        weights.restore([self._patch(v.patch_sha256) for v in chain if v.patch_sha256])
        checksum = weights.checksum()
        if checksum != chain[-1].checksum:
            weights.reset_to(undo)
            raise IntegrityError(
                f"restored weights of version {number} hash to {checksum[:12]}, "
                f"the ledger recorded {chain[-1].checksum[:12]}"
            )
        self.version, self.checksum = number, checksum
        return chain[-1]

    def _follow_head(self) -> None:
        """Catch up with versions another writer recorded (a follower's only write path)."""
        head = self.ledger.head()
        if head.number != self.version:
            self._restore(head.number)

    def _on_base(self, work: Callable[[], T]) -> T:
        """Run `work` on the base weights, then put the current ones back."""
        weights = self._weights()
        undo = weights.snapshot()
        try:
            weights.restore([])
            return work()
        finally:
            weights.reset_to(undo)

    def _ensure_statistics(self, layers: list[int]) -> None:
        """Statistics always describe the base weights: compute missing ones on the base."""
        stats = self.editor.stats
        missing = stats.missing(layers) if isinstance(stats, CorpusStatistics) else []
        if missing:
            self._on_base(lambda: stats.prepare(missing))

    def _base_prefixes(self, hparams: Any) -> list[str]:
        """Context prefixes sampled from the base weights, so an edit is a function of the
        ledger alone: a restarted worker computes the same patch as one that never stopped."""
        key = (hparams.prefixes, hparams.prefix_length, hparams.seed)
        if key not in self._prefixes_on_base:
            self._prefixes_on_base[key] = self._on_base(lambda: self.editor.prefixes(hparams))
            self.editor.forget_prefixes()
        return self._prefixes_on_base[key]

    def _commit(
        self,
        new: NewVersion,
        patch: Patch | None,
        job_id: int,
        finish_job: bool,
        applied_edits: tuple[str, ...] | list[str] = (),
        diagnostics: dict[str, dict[str, Any]] | None = None,
        applied_from: WeightSnapshot | None = None,
        progress: JobProgress | None = None,
    ) -> Version:
        """Apply `patch`, record the version; on any failure the weights go back. With
        `applied_from` the patch is already applied (by the guard) on top of that snapshot."""
        weights = self._weights()
        undo = applied_from if applied_from is not None else weights.snapshot()
        try:
            if progress is not None:
                progress(1.0, "recording the version")
            sha = None
            if patch is not None:
                if applied_from is None:
                    weights.apply(patch)
                sha = self.blobs.put(patch.to_bytes())
                self._patches[sha] = patch
            new = dataclasses.replace(new, checksum=weights.checksum(), patch_sha256=sha)
            version = self.ledger.add_version(new, job_id, finish_job, applied_edits, diagnostics)
        except BaseException:
            weights.reset_to(undo)
            raise
        self.version, self.checksum = version.number, version.checksum
        return version

    def _compute(
        self,
        requests_of: list[dict[str, Any]],
        method: str,
        overrides: dict[str, Any],
        progress: JobProgress | None,
        prefixes: list[str] | None = None,
    ) -> EditResult:
        requests = [request_from_record(r) for r in requests_of]
        editor = self.editor
        hparams = editor.hparams(method, overrides)
        layers = editor.statistics_layers(method, overrides)
        stats = editor.stats
        if progress is not None and hasattr(stats, "progress"):
            stats.progress = progress  # type: ignore[attr-defined]
        self._ensure_statistics(layers)
        prefixes = prefixes if prefixes is not None else self._base_prefixes(hparams)
        history = self._history() if get_method(method).uses_history else []
        return editor.compute(
            requests, method, overrides, progress=progress, prefixes=prefixes, history=history
        )

    def _history(self) -> list[Patch]:
        """The patches in effect at the current version, oldest first: the chain's, less
        those a subtract revert took back (a method's state, such as AlphaEdit's earlier
        keys, is read from them, so a rollback restores it with the weights)."""
        chain = self.ledger.chain(self.version)
        taken_back = {v.reverts for v in chain if v.reverts is not None}
        return [
            self._patch(v.patch_sha256)
            for v in chain
            if v.patch_sha256 and v.reverts is None and v.number not in taken_back
        ]

    # -- evaluation -------------------------------------------------------------------------

    def sandbox(self, method: str, overrides: dict[str, Any], at_head: bool = False) -> Editor:
        """An editor on a private copy of the model (base weights, or the ledger head's),
        for evaluation runs that edit freely while the served model goes on serving. The
        method's statistics are prepared on the base first, so the copy never computes any.
        The copy costs the model's memory once more while the run lasts."""

        def on_lane() -> Editor:
            editor = self.editor
            self._ensure_statistics(editor.statistics_layers(method, overrides))
            if at_head:
                self._follow_head()
                copy = deepcopy(self.model)
            else:
                copy = self._on_base(lambda: deepcopy(self.model))
            return Editor(copy, self.tok, editor.stats, editor.spec)

        return self.lane.call(on_lane)

    async def evaluate(
        self, requests: list[EditRequest], baseline: bool
    ) -> tuple[int, dict[str, float | None], dict[str, float | None] | None]:
        """EasyEdit and CounterFact metrics at the current version; locality compares with
        the base weights' predictions, and `baseline` scores the base weights as well."""

        def on_lane() -> tuple[int, dict[str, float | None], dict[str, float | None] | None]:
            self._follow_head()
            reference = self._on_base(lambda: locality_reference(self.model, self.tok, requests))
            scores = evaluate(self.model, self.tok, requests, reference)
            base = (
                self._on_base(lambda: evaluate(self.model, self.tok, requests, reference))
                if baseline
                else None
            )
            return self.version, scores, base

        return await self.lane.run(on_lane)

    # -- generation -------------------------------------------------------------------------

    async def generate(self, request: GenerationRequest) -> GenerationOutput:
        return await self.batcher.generate(request)

    def _generate_on_lane(self, requests: list[GenerationRequest]) -> list[GenerationOutput]:
        self._follow_head()
        outputs = generate_batch(self.model, self.tok, requests)
        for output in outputs:
            output.version = self.version
        return outputs

    # -- jobs (called from the worker thread; model work goes to the lane) -------------------

    def run_job(self, job_id: int) -> None:
        with self._job_lock:
            job = self.ledger.job(job_id)
            if job is None or job.status.terminal:
                return  # idempotent: a redelivered job that already ended
            token = request_id.set(job.payload.get("request_id"))
            try:
                self._run_job(job)
            finally:
                request_id.reset(token)

    def _run_job(self, job: Job) -> None:
        job_id = job.id
        if job.kind == JobKind.edit and self.ledger.job_has_version(job_id):
            version = self.ledger.head()
            self.ledger.finish_job(job_id, Status.applied, result_version=version.number)
            return
        if job.attempts >= self.max_job_attempts:
            message = f"interrupted {job.attempts} times while running; not retried"
            self.ledger.finish_job(job_id, Status.failed, message, "Interrupted")
            return
        job = self.ledger.start_job(job_id)
        progress = JobProgress(self.ledger, job_id)
        started, status = time.perf_counter(), Status.applied
        extra = {"job_id": job_id, "status": "running"}
        log.info("job %s (%s) started, attempt %s", job_id, job.kind, job.attempts, extra=extra)
        try:
            if job.kind == JobKind.edit:
                self._run_edit(job, progress)
            elif job.kind == JobKind.rollback:
                self._run_rollback(job)
            else:
                self._run_revert(job, progress)
        except SQLAlchemyError:
            raise  # the ledger is unreachable: the worker retries the job when it is back
        except EditError as exc:
            status = Status.rejected
            if isinstance(exc, GuardRejectedError):
                self.ledger.set_job_result(job_id, {"guard": exc.report.to_dict()})
            self.ledger.finish_job(job_id, status, str(exc), _error_type(exc))
        except Exception as exc:
            status = Status.failed
            log.exception("job %s failed", job_id, extra={"job_id": job_id})
            self.ledger.finish_job(job_id, status, str(exc), type(exc).__name__)
        seconds = time.perf_counter() - started
        extra = {"job_id": job_id, "status": str(status), "seconds": round(seconds, 3)}
        log.info("job %s (%s) %s in %.2f s", job_id, job.kind, status, seconds, extra=extra)
        if self.metrics is not None and job.kind == JobKind.edit:
            method = str(job.payload.get("method", "unknown"))
            self.metrics.edit_seconds.labels(method, str(status)).observe(seconds)

    def _run_edit(self, job: Job, progress: JobProgress) -> None:
        edits = self.ledger.edits_of_job(job.id)
        records = [e.request for e in edits]
        method, overrides = edits[0].method, edits[0].hparams

        def on_lane() -> Version:
            self._follow_head()
            parent = self.version
            result = self._compute(records, method, overrides, progress)
            per_edit = _diagnostics_per_edit(result, [e.id for e in edits])
            applied_from = None
            if self.guard is not None:
                progress(1.0, "guard: measuring the edit's effect")
                report, applied_from = self.guard.check(
                    result.patch, self._weights(), self.checksum
                )
                if not report.passed:
                    raise GuardRejectedError(report)
                for diagnostics in per_edit.values():
                    diagnostics["guard"] = report.to_dict()
            return self._commit(
                NewVersion(
                    kind=VersionKind.edit,
                    parent=parent,
                    checksum="",
                    edit_ids=tuple(e.id for e in edits),
                    note=f"{method} edit of {len(edits)} fact(s)",
                    seconds=result.diagnostics.seconds,
                ),
                result.patch,
                job.id,
                finish_job=True,
                applied_edits=[e.id for e in edits],
                diagnostics=per_edit,
                applied_from=applied_from,
                progress=progress,
            )

        self.lane.call(on_lane)

    def _run_rollback(self, job: Job) -> None:
        target = int(job.payload["to_version"])

        def on_lane() -> Version:
            if self.ledger.version(target) is None:
                raise JobRejectedError(f"version {target} does not exist", field="to_version")
            self._follow_head()
            previous = self.version
            self._restore(target)
            try:
                return self._commit(
                    NewVersion(
                        kind=VersionKind.rollback,
                        parent=target,
                        checksum="",
                        note=f"rollback to version {target}",
                    ),
                    None,
                    job.id,
                    finish_job=True,
                )
            except BaseException:
                self._restore(previous)
                raise

        self.lane.call(on_lane)

    def _run_revert(self, job: Job, progress: JobProgress) -> None:
        edit_id, mode = str(job.payload["edit_id"]), str(job.payload["mode"])

        def on_lane() -> None:
            self._follow_head()
            chain = self.ledger.chain(self.version)
            carrier_number = live_edits(chain).get(edit_id)
            if carrier_number is None:
                raise JobRejectedError(
                    f"edit {edit_id} is not in effect at version {self.version}", field="edit_id"
                )
            index = next(i for i, v in enumerate(chain) if v.number == carrier_number)
            carrier = chain[index]
            if mode == "subtract":
                self._revert_subtract(job, carrier, edit_id)
            else:
                self._revert_rebase(job, chain, index, edit_id, progress)

        self.lane.call(on_lane)

    def _revert_subtract(self, job: Job, carrier: Version, edit_id: str) -> None:
        if len(carrier.edit_ids) > 1:
            raise JobRejectedError(
                f"edit {edit_id} was applied in a batch of {len(carrier.edit_ids)}; "
                "subtract removes whole patches only, use mode=rebase",
                field="mode",
            )
        assert carrier.patch_sha256 is not None
        patch = self._patch(carrier.patch_sha256)
        if patch.codebooks:
            raise JobRejectedError(
                f"edit {edit_id} is codebook entries ({patch.method}), which a subtraction "
                "cannot take back; use mode=rebase",
                field="mode",
            )
        self._commit(
            NewVersion(
                kind=VersionKind.revert,
                parent=self.version,
                checksum="",
                reverts=carrier.number,
                note=f"revert edit {edit_id} (subtract the patch of version {carrier.number})",
            ),
            negated(patch),
            job.id,
            finish_job=True,
        )

    def _revert_rebase(
        self, job: Job, chain: list[Version], index: int, edit_id: str, progress: JobProgress
    ) -> None:
        """Back to the version before the edit, then recompute every later edit on top."""
        subtracted = {v.reverts for v in chain if v.reverts is not None}
        carrier, later = chain[index], chain[index + 1 :]
        steps: list[tuple[str, ...]] = []
        if len(carrier.edit_ids) > 1:
            steps.append(tuple(e for e in carrier.edit_ids if e != edit_id))
        for version in later:
            if (
                version.patch_sha256
                and version.reverts is None
                and version.number not in subtracted
            ):
                steps.append(tuple(version.edit_ids))
        restart = chain[index - 1].number
        self._restore(restart)
        last = self._commit(
            NewVersion(
                kind=VersionKind.revert,
                parent=restart,
                checksum="",
                note=f"revert edit {edit_id} (rebase): restart from version {restart}",
            ),
            None,
            job.id,
            finish_job=not steps,
        )
        for number, edit_ids in enumerate(steps):
            edits = self.ledger.edits_by_id(edit_ids)
            progress.span = (number / len(steps), (number + 1) / len(steps))
            prefixes = (edits[0].diagnostics or {}).get("prefixes")
            result = self._compute(
                [e.request for e in edits], edits[0].method, edits[0].hparams, progress, prefixes
            )
            last = self._commit(
                NewVersion(
                    kind=VersionKind.rebase,
                    parent=last.number,
                    checksum="",
                    edit_ids=edit_ids,
                    note=f"{edits[0].method} edit of {len(edits)} fact(s) recomputed without "
                    f"edit {edit_id}",
                    seconds=result.diagnostics.seconds,
                ),
                result.patch,
                job.id,
                finish_job=number == len(steps) - 1,
            )


def negated(patch: Patch) -> Patch:
    deltas = {
        name: FactoredDelta(-d.left, d.right) if isinstance(d, FactoredDelta) else -d
        for name, d in patch.deltas.items()
    }
    return Patch(patch.method, deltas, {**patch.metadata, "negated": "true"})


def _diagnostics_per_edit(result: EditResult, edit_ids: list[str]) -> dict[str, dict[str, Any]]:
    d = result.diagnostics.to_dict()
    per_edit = {}
    for index, edit_id in enumerate(edit_ids):
        one = dict(d)
        for key in ("prob_before", "prob_after"):
            values = d.get(key) or []
            one[key] = values[index] if index < len(values) else None
        per_edit[edit_id] = one
    return per_edit


def _error_type(exc: Exception) -> str:
    return type(exc).__name__.removesuffix("Error") or "EditError"


def torch_dtype(name: str, device: str) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def resolve_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name
