"""The job runner: carries out one claimed ledger job with one small handler per kind.

A handler computes on the workspace (the writer's own copy of the model, on its lane),
applies the result there and records the version in one ledger transaction; if the record
fails, the workspace goes back. Only a recorded version is then published: the served
model swaps it in. Every ledger write carries the writer's fencing token: a process that
lost the writer lease records nothing (StaleWriterError).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from typing import Any

from sqlalchemy.exc import SQLAlchemyError

from editors.codebook import fresh_keys
from editors.errors import EditError
from editors.patch import Patch
from editors.result import EditResult
from editors.weight_state import WeightSnapshot

from ..ledger.blobs import BlobStore
from ..ledger.lease import StaleWriterError
from ..ledger.schema import Job, JobKind, Status, Version, VersionKind
from ..ledger.store import Ledger, NewVersion, live_edits
from ..observability import ServiceMetrics, request_id
from .guard import EditGuard, GuardReport
from .progress import JobCancelledError, JobProgress, JobTimeLimitError
from .replayer import Replayer
from .workspace import Workspace

log = logging.getLogger(__name__)


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


@dataclasses.dataclass
class _Run:
    """One job being run: what every handler needs."""

    job: Job
    fence: int | None
    progress: JobProgress


class JobRunner:
    def __init__(
        self,
        workspace: Workspace,
        replayer: Replayer,
        ledger: Ledger,
        blobs: BlobStore,
        guard: EditGuard | None = None,
        metrics: ServiceMetrics | None = None,
        max_job_attempts: int = 3,
        announce: Callable[[int], None] = lambda number: None,
        identity: str = "editserve",
        publish: Callable[[int], None] = lambda number: None,
        time_limit_seconds: float | None = None,
    ) -> None:
        """`replayer` is the workspace's; `publish(number)` has the served model swap in a
        version just recorded; `announce(number)` tells the other processes."""
        self.workspace, self.replayer, self.ledger, self.blobs = workspace, replayer, ledger, blobs
        self.guard, self.metrics, self.max_job_attempts = guard, metrics, max_job_attempts
        self.announce, self.identity, self.publish = announce, identity, publish
        self.time_limit_seconds = time_limit_seconds

    def run_job(self, job_id: int, fence: int | None = None) -> None:
        """Run a job to its end. Raises StaleWriterError (this process must stand down) and
        SQLAlchemyError (the ledger is unreachable: the job is retried when it is back)."""
        job = self.ledger.job(job_id)
        if job is None or job.status.terminal:
            return  # idempotent: a redelivered job that already ended
        token = request_id.set(job.payload.get("request_id"))
        try:
            self._run(job, fence)
        finally:
            request_id.reset(token)

    def _run(self, job: Job, fence: int | None) -> None:
        if job.attempts >= self.max_job_attempts:
            message = f"interrupted {job.attempts} times while running; not retried"
            self.ledger.finish_job(job.id, Status.failed, message, "Interrupted", fence=fence)
            return
        claimed = self.ledger.start_job(job.id, fence, self.identity)
        if claimed is None:
            return
        progress = JobProgress(self.ledger, job.id, time_limit_seconds=self.time_limit_seconds)
        run = _Run(claimed, fence, progress)
        started, status = time.perf_counter(), Status.applied
        extra = {"job_id": job.id, "status": "running"}
        log.info("job %s (%s) started, attempt %s", job.id, job.kind, claimed.attempts, extra=extra)
        handler = {
            JobKind.edit: self._edit,
            JobKind.rollback: self._rollback,
            JobKind.revert: self._revert,
        }[job.kind]
        try:
            number = self.workspace.lane.call(handler, run)
        except (SQLAlchemyError, StaleWriterError):
            raise
        except JobCancelledError as exc:
            status = Status.cancelled
            self.ledger.finish_job(job.id, status, str(exc), "Cancelled", fence=fence)
        except JobTimeLimitError as exc:
            status = Status.failed
            self.ledger.finish_job(job.id, status, str(exc), "TimeLimit", fence=fence)
        except EditError as exc:
            status = Status.rejected
            if isinstance(exc, GuardRejectedError):
                self.ledger.set_job_result(job.id, {"guard": exc.report.to_dict()}, fence)
            self.ledger.finish_job(job.id, status, str(exc), _error_type(exc), fence=fence)
        except Exception as exc:
            status = Status.failed
            log.exception("job %s failed", job.id, extra={"job_id": job.id})
            self.ledger.finish_job(job.id, status, str(exc), type(exc).__name__, fence=fence)
        else:
            self._publish(number)
        seconds = time.perf_counter() - started
        extra = {"job_id": job.id, "status": str(status), "seconds": round(seconds, 3)}
        log.info("job %s (%s) %s in %.2f s", job.id, job.kind, status, seconds, extra=extra)
        if self.metrics is not None and job.kind == JobKind.edit:
            method = str(job.payload.get("method", "unknown"))
            self.metrics.edit_seconds.labels(method, str(status)).observe(seconds)

    def record(
        self, job_id: int, new: NewVersion, patch: Patch, applied_edits: list[str]
    ) -> Version:
        """Record an already computed `patch` as the next version of a started job, as a
        handler would (on the lane; for tools that build ledgers, such as the benchmarks)."""
        run = _Run(self.ledger.job(job_id), None, JobProgress(self.ledger, job_id))  # type: ignore[arg-type]
        version = self.workspace.lane.call(self._commit, run, new, patch, applied_edits)
        self._publish(version.number)
        return version

    def _publish(self, number: int) -> None:
        """The served model swaps in the recorded version, then the other processes hear."""
        self.publish(number)
        self.announce(number)

    # -- recording (on the lane) --------------------------------------------------------------

    def _store(self, patch: Patch) -> str:
        sha = self.blobs.put(patch.to_bytes())
        self.replayer.remember(sha, patch)
        return sha

    def _commit(
        self,
        run: _Run,
        new: NewVersion,
        patch: Patch | None,
        applied_edits: list[str] | None = None,
        diagnostics: dict[str, dict[str, Any]] | None = None,
        applied_from: WeightSnapshot | None = None,
    ) -> Version:
        """Apply `patch` (unless `applied_from` says it already is, on top of that snapshot),
        record the version; on any failure the weights go back."""
        weights = self.workspace.weights
        undo = applied_from if applied_from is not None else weights.snapshot()
        try:
            run.progress(1.0, "recording the version")
            run.progress.check()
            sha = None
            if patch is not None:
                if applied_from is None:
                    weights.apply(patch)
                sha = self._store(patch)
            new = dataclasses.replace(new, checksum=weights.checksum(), patch_sha256=sha)
            version = self.ledger.add_version(
                new, run.job.id, True, applied_edits or [], diagnostics, run.fence
            )
        except BaseException:
            weights.reset_to(undo)
            raise
        self.replayer.committed(version)
        return version

    def _with_fresh_keys(self, patch: Patch) -> Patch:
        """`patch` with new keys for the codebook entries already served, read on the
        weights `patch` makes: a change below a codebook's module moves the inputs its
        entries were keyed on, so without this they would stop firing (added neurons are
        such a change too)."""
        weights = self.workspace.weights
        served = weights.codebooks
        changes = patch.deltas or patch.neurons or len(set(served) | set(patch.codebooks)) > 1
        if not served or not changes:
            return patch
        for path, book in served.items():
            if book.contexts is None:
                raise JobRejectedError(
                    f"the codebook entries at {path} were recorded without their contexts, "
                    "so they cannot follow this change of the weights; revert them first",
                    field="method",
                )
        undo = weights.snapshot()
        try:
            weights.apply(patch)
            rekeys = {
                path: fresh_keys(self.workspace.model, path, book.contexts or ())
                for path, book in served.items()
            }
        finally:
            weights.reset_to(undo)
        return patch.with_rekeys(rekeys)

    def _checked(self, patch: Patch, checksum: str, run: _Run) -> tuple[GuardReport | None, Any]:
        """Apply `patch` through the guard (when one is configured): its report and the
        snapshot that takes the patch back; refused patches raise GuardRejectedError."""
        if self.guard is None:
            return None, None
        run.progress(1.0, "guard: measuring the edit's effect")
        report, applied_from = self.guard.check(patch, self.workspace.weights, checksum)
        if not report.passed:
            raise GuardRejectedError(report)
        return report, applied_from

    # -- handlers (on the lane) ---------------------------------------------------------------

    def _edit(self, run: _Run) -> int:
        edits = self.ledger.edits_of_job(run.job.id)
        method, overrides = edits[0].method, edits[0].hparams
        self.replayer.follow()
        head = self.replayer.version
        result = self.workspace.compute(
            [e.request for e in edits], method, overrides, run.progress, self.replayer.history
        )
        per_edit = _diagnostics_per_edit(result, [e.id for e in edits])
        patch = self._with_fresh_keys(result.patch)
        report, applied_from = self._checked(patch, self.replayer.checksum, run)
        if report is not None:
            for diagnostics in per_edit.values():
                diagnostics["guard"] = report.to_dict()
        return self._commit(
            run,
            NewVersion(
                kind=VersionKind.edit,
                parent=head,
                checksum="",
                edit_ids=tuple(e.id for e in edits),
                note=f"{method} edit of {len(edits)} fact(s)",
                seconds=result.diagnostics.seconds,
            ),
            patch,
            [e.id for e in edits],
            per_edit,
            applied_from,
        ).number

    def _rollback(self, run: _Run) -> int:
        target = int(run.job.payload["to_version"])
        if self.ledger.version(target) is None:
            raise JobRejectedError(f"version {target} does not exist", field="to_version")
        self.replayer.follow()
        head = self.replayer.version
        self.replayer.move_to(target)
        try:
            return self._commit(
                run,
                NewVersion(
                    kind=VersionKind.rollback,
                    parent=target,
                    checksum="",
                    note=f"rollback to version {target}",
                    on_head=head,
                ),
                None,
            ).number
        except BaseException:
            self.replayer.move_to(head)
            raise

    def _revert(self, run: _Run) -> int:
        edit_id, mode = str(run.job.payload["edit_id"]), str(run.job.payload["mode"])
        self.replayer.follow()
        chain = self.replayer.chain
        carrier_number = live_edits(chain).get(edit_id)
        if carrier_number is None:
            raise JobRejectedError(
                f"edit {edit_id} is not in effect at version {self.replayer.version}",
                field="edit_id",
            )
        index = next(i for i, v in enumerate(chain) if v.number == carrier_number)
        if mode == "subtract":
            return self._revert_subtract(run, chain[index], edit_id)
        return self._revert_rebase(run, chain, index, edit_id)

    def _revert_subtract(self, run: _Run, carrier: Version, edit_id: str) -> int:
        if len(carrier.edit_ids) > 1:
            raise JobRejectedError(
                f"edit {edit_id} was applied in a batch of {len(carrier.edit_ids)}; "
                "subtract removes whole patches only, use mode=rebase",
                field="mode",
            )
        assert carrier.patch_sha256 is not None
        patch = self.replayer.patch(carrier.patch_sha256)
        if not patch.subtractable:
            raise JobRejectedError(
                f"edit {edit_id} adds state beside the weights ({patch.method}: codebook "
                "entries or neurons), which a subtraction "
                "cannot take back; use mode=rebase",
                field="mode",
            )
        return self._commit(
            run,
            NewVersion(
                kind=VersionKind.revert,
                parent=self.replayer.version,
                checksum="",
                reverts=carrier.number,
                note=f"revert edit {edit_id} (subtract the patch of version {carrier.number})",
            ),
            self._with_fresh_keys(patch.negated()),
        ).number

    def _revert_rebase(self, run: _Run, chain: list[Version], index: int, edit_id: str) -> int:
        """Back to the version before the edit, every later edit recomputed on top (each
        through the guard); all the new versions are recorded in one transaction, so a crash
        leaves either the old head or the whole rebase."""
        head, served = self.replayer.version, self.replayer.chain
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
        weights = self.workspace.weights
        undo = weights.snapshot()
        try:
            self.replayer.move_to(restart)
            history = self.replayer.history()
            news = [
                NewVersion(
                    kind=VersionKind.revert,
                    parent=restart,
                    checksum=self.replayer.checksum,
                    note=f"revert edit {edit_id} (rebase): restart from version {restart}",
                    on_head=head,
                )
            ]
            for number, edit_ids in enumerate(steps):
                run.progress.span = (number / len(steps), (number + 1) / len(steps))
                result = self._recompute(run, edit_ids, history)
                patch = self._with_fresh_keys(result.patch)
                _, applied_from = self._checked(patch, weights.checksum(), run)
                if applied_from is None:
                    weights.apply(patch)
                history = [*history, patch]
                parent = head + len(news)
                news.append(
                    NewVersion(
                        kind=VersionKind.rebase,
                        parent=parent,
                        checksum=weights.checksum(),
                        patch_sha256=self._store(patch),
                        edit_ids=edit_ids,
                        note=f"{patch.method} edit of {len(edit_ids)} fact(s) "
                        f"recomputed without edit {edit_id}",
                        seconds=result.diagnostics.seconds,
                        on_head=parent,
                    )
                )
            run.progress(1.0, "recording the versions")
            run.progress.check()
            versions = self.ledger.add_versions(news, run.job.id, run.fence)
        except BaseException:
            weights.reset_to(undo)
            self.replayer.chain = served
            raise
        self.replayer.chain = self.ledger.chain(versions[-1].number)
        return versions[-1].number

    def _recompute(self, run: _Run, edit_ids: tuple[str, ...], history: list[Patch]) -> EditResult:
        edits = self.ledger.edits_by_id(edit_ids)
        prefixes = (edits[0].diagnostics or {}).get("prefixes")
        return self.workspace.compute(
            [e.request for e in edits],
            edits[0].method,
            edits[0].hparams,
            run.progress,
            lambda: history,
            prefixes,
        )


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
