"""Ledger operations. Every state change is one transaction, so a crash leaves either the
old or the new record, never half of one; rows are appended or move forward in status,
never deleted."""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from .lease import LINEAGE_ID, Leases, advance_head, check_fence
from .schema import (
    Edit,
    EvaluationResult,
    Job,
    JobKind,
    Lineage,
    Status,
    Version,
    VersionKind,
    utcnow,
)


class LedgerMismatchError(RuntimeError):
    """The ledger was recorded on other base weights than the ones loaded."""


class JobCancelledError(Exception):
    """The job was cancelled on request: it records nothing."""


@dataclass(frozen=True)
class NewEdit:
    request: dict[str, Any]
    method: str
    hparams: dict[str, Any]


@dataclass(frozen=True)
class NewVersion:
    kind: VersionKind
    parent: int
    checksum: str
    patch_sha256: str | None = None
    edit_ids: tuple[str, ...] = ()
    reverts: int | None = None
    note: str = ""
    seconds: dict[str, float] | None = None
    on_head: int | None = None  # the head it was computed on; None: its parent

    @property
    def computed_on(self) -> int:
        return self.parent if self.on_head is None else self.on_head


class Ledger:
    """Writes that only the lease holder may make take its fencing token as `fence`
    (None: unfenced, for tools and tests on a ledger no service is writing)."""

    def __init__(self, sessions: sessionmaker[Session], model: str) -> None:
        self.sessions = sessions
        self.model = model
        self.leases = Leases(sessions)

    # -- versions ---------------------------------------------------------------------------

    def ensure_base(self, checksum: str) -> Version:
        """Record version 0 (the base weights) on first start; refuse other base weights.
        Processes starting together on a new ledger race to record it: the losers read it."""
        try:
            return self._ensure_base(checksum)
        except IntegrityError:
            return self._ensure_base(checksum)

    def _ensure_base(self, checksum: str) -> Version:
        with self.sessions.begin() as session:
            base = session.get(Version, 0)
            if base is None:
                base = Version(
                    number=0,
                    parent=None,
                    kind=VersionKind.base,
                    checksum=checksum,
                    model=self.model,
                    note="base weights",
                    edit_ids=[],
                    seconds={},
                )
                session.add(base)
                session.flush()
            elif base.checksum != checksum:
                raise LedgerMismatchError(
                    f"the ledger's base weights ({base.model}, checksum {base.checksum[:12]}) "
                    f"differ from the loaded model ({self.model}, checksum {checksum[:12]})"
                )
            if session.get(Lineage, LINEAGE_ID) is None:
                session.add(Lineage(id=LINEAGE_ID, head=0, writer=None, token=0, beat=0))
            return base

    def head(self) -> Version:
        with self.sessions() as session:
            number = session.scalar(select(func.max(Version.number)))
            if number is None:
                raise LookupError("the ledger has no base version yet")
            version = session.get(Version, number)
            assert version is not None
            return version

    def version(self, number: int) -> Version | None:
        with self.sessions() as session:
            return session.get(Version, number)

    def versions(self, limit: int = 100, offset: int = 0) -> list[Version]:
        with self.sessions() as session:
            query = select(Version).order_by(Version.number.desc()).limit(limit).offset(offset)
            return list(session.scalars(query))

    def chain(self, number: int) -> list[Version]:
        """Versions from the base to `number` along parents: whose patches make its weights."""
        # one recursive query along the parent links, whatever the ledger's size; a parent
        # is always an earlier version, so number order is chain order
        links = (
            select(Version.number, Version.parent)
            .where(Version.number == number)
            .cte("chain", recursive=True)
        )
        links = links.union_all(
            select(Version.number, Version.parent).join(links, Version.number == links.c.parent)
        )
        with self.sessions() as session:
            query = select(Version).join(links, Version.number == links.c.number)
            chain = list(session.scalars(query.order_by(Version.number)))
        if not chain:
            raise KeyError(number)
        return chain

    def add_version(
        self,
        new: NewVersion,
        job_id: int,
        finish_job: bool,
        applied_edits: Iterable[str] = (),
        diagnostics: dict[str, dict[str, Any]] | None = None,
        fence: int | None = None,
    ) -> Version:
        """Append a version on top of the head it was computed on and, in the same
        transaction, mark its edits (and job) applied. Fails with StaleWriterError when the
        head has moved since or the lease is no longer `fence`'s."""
        with self.sessions.begin() as session:
            self._lock_uncancelled(session, job_id)
            version = self._insert(session, new, job_id, fence)
            now = utcnow()
            for edit_id in applied_edits:
                edit = session.get(Edit, edit_id)
                assert edit is not None
                if edit.status != Status.applied:
                    edit.status, edit.version, edit.applied_at = Status.applied, version.number, now
                if diagnostics and edit_id in diagnostics:
                    edit.diagnostics = diagnostics[edit_id]
            self._close_job(session, job_id, version.number, finish_job)
            return version

    def add_versions(
        self, news: list[NewVersion], job_id: int, fence: int | None = None
    ) -> list[Version]:
        """Append several versions, each on the one before, and finish their job: all in
        one transaction, so a crash leaves all of them or none (a rebase)."""
        with self.sessions.begin() as session:
            self._lock_uncancelled(session, job_id)
            versions = [self._insert(session, new, job_id, fence) for new in news]
            self._close_job(session, job_id, versions[-1].number, True)
            return versions

    @staticmethod
    def _lock_uncancelled(session: Session, job_id: int) -> None:
        """Lock the job's row; a job whose cancel was asked for records nothing (the lock
        orders this against `request_cancel`: a cancel either stops the version or finds
        the job ended)."""
        job = session.get(Job, job_id, with_for_update=True)
        if job is not None and job.cancel_requested:
            raise JobCancelledError(f"job {job_id} was cancelled")

    def _insert(self, session: Session, new: NewVersion, job_id: int, fence: int | None) -> Version:
        number = advance_head(session, new.computed_on, fence)
        version = Version(
            number=number,
            parent=new.parent,
            kind=new.kind,
            job_id=job_id,
            patch_sha256=new.patch_sha256,
            checksum=new.checksum,
            edit_ids=list(new.edit_ids),
            reverts=new.reverts,
            model=self.model,
            note=new.note,
            seconds=dict(new.seconds or {}),
        )
        session.add(version)
        session.flush()
        return version

    @staticmethod
    def _close_job(session: Session, job_id: int, number: int, finish: bool) -> None:
        job = session.get(Job, job_id)
        assert job is not None
        job.result_version = number
        if finish:
            job.status, job.stage, job.percent = Status.applied, "done", 100.0
            job.finished_at = utcnow()

    # -- jobs -------------------------------------------------------------------------------

    def accept_edits(
        self, edits: list[NewEdit], payload: dict[str, Any] | None = None
    ) -> tuple[Job, list[str]]:
        """Record an edit job with its edits, all `queued` (the caller's 202)."""
        with self.sessions.begin() as session:
            job = Job(
                kind=JobKind.edit, status=Status.queued, payload=payload or {}, stage="queued"
            )
            session.add(job)
            session.flush()
            ids = []
            for position, new in enumerate(edits):
                edit = Edit(
                    id=str(uuid.uuid4()),
                    job_id=job.id,
                    position=position,
                    method=new.method,
                    hparams=new.hparams,
                    request=new.request,
                    status=Status.queued,
                )
                session.add(edit)
                ids.append(edit.id)
            return job, ids

    def accept_job(self, kind: JobKind, payload: dict[str, Any]) -> Job:
        with self.sessions.begin() as session:
            job = Job(kind=kind, status=Status.queued, payload=payload, stage="queued")
            session.add(job)
            session.flush()
            return job

    def job(self, job_id: int) -> Job | None:
        with self.sessions() as session:
            return session.get(Job, job_id)

    def next_pending_job(self, evaluations: bool = False) -> Job | None:
        """The oldest job not yet finished (queued, or running when a worker was
        interrupted): of the model's own jobs, or with `evaluations` of the evaluation jobs,
        which run apart on a copy of the model."""
        kind = Job.kind == JobKind.evaluate if evaluations else Job.kind != JobKind.evaluate
        with self.sessions() as session:
            query = (
                select(Job)
                .where(Job.status.in_([Status.queued, Status.running]), kind)
                .order_by(Job.id)
                .limit(1)
            )
            return session.scalars(query).first()

    def jobs(self, kind: JobKind, limit: int = 100, offset: int = 0) -> list[Job]:
        with self.sessions() as session:
            query = select(Job).where(Job.kind == kind).order_by(Job.id.desc())
            return list(session.scalars(query.limit(limit).offset(offset)))

    def set_job_result(self, job_id: int, result: dict[str, Any], fence: int | None = None) -> None:
        with self.sessions.begin() as session:
            check_fence(session, fence)
            job = session.get(Job, job_id)
            assert job is not None
            job.result = result

    def request_cancel(self, job_id: int) -> Job | None:
        """Ask a queued or running job to stop; a queued one is cancelled at once (with
        its edits), a running one at its next step."""
        with self.sessions.begin() as session:
            job = session.get(Job, job_id, with_for_update=True)
            if job is None or job.status.terminal:
                return job
            job.cancel_requested = True
            if job.status == Status.queued:
                job.status, job.stage, job.finished_at = Status.cancelled, "cancelled", utcnow()
                job.error, job.error_type = "cancelled on request", "Cancelled"
                for edit in session.scalars(select(Edit).where(Edit.job_id == job_id)):
                    if not edit.status.terminal:
                        edit.status, edit.error = Status.cancelled, "cancelled on request"
            return job

    def cancel_requested(self, job_id: int) -> bool:
        with self.sessions() as session:
            return bool(session.scalar(select(Job.cancel_requested).where(Job.id == job_id)))

    # -- evaluation results -------------------------------------------------------------------

    def add_evaluation_result(self, job_id: int, row: dict[str, Any]) -> None:
        with self.sessions.begin() as session:
            session.add(EvaluationResult(job_id=job_id, **row))

    def evaluation_results(self, job_id: int) -> list[EvaluationResult]:
        with self.sessions() as session:
            query = select(EvaluationResult).where(EvaluationResult.job_id == job_id)
            return list(session.scalars(query.order_by(EvaluationResult.id)))

    def pending_job_ids(self) -> list[int]:
        with self.sessions() as session:
            query = select(Job.id).where(Job.status.in_([Status.queued, Status.running]))
            return list(session.scalars(query.order_by(Job.id)))

    def pending_job_count(self) -> int:
        with self.sessions() as session:
            query = select(func.count()).select_from(Job)
            query = query.where(Job.status.in_([Status.queued, Status.running]))
            return int(session.scalar(query) or 0)

    def start_job(
        self, job_id: int, fence: int | None = None, claimed_by: str | None = None
    ) -> Job | None:
        """Claim a queued or interrupted job (None: it ended meanwhile)."""
        with self.sessions.begin() as session:
            check_fence(session, fence)
            job = session.get(Job, job_id)
            if job is None or job.status.terminal:
                return None
            job.claimed_by = claimed_by
            job.status, job.attempts, job.started_at = Status.running, job.attempts + 1, utcnow()
            job.stage, job.percent = "starting", 0.0
            for edit in session.scalars(select(Edit).where(Edit.job_id == job_id)):
                if edit.status == Status.queued:
                    edit.status = Status.running
            return job

    def progress(self, job_id: int, stage: str, percent: float) -> None:
        with self.sessions.begin() as session:
            job = session.get(Job, job_id)
            if job is not None and job.status == Status.running:
                job.stage, job.percent = stage, round(float(percent), 1)

    def finish_job(
        self,
        job_id: int,
        status: Status,
        error: str | None = None,
        error_type: str | None = None,
        result_version: int | None = None,
        fence: int | None = None,
    ) -> None:
        """End a job; its edits that did not apply take the same status and error."""
        with self.sessions.begin() as session:
            check_fence(session, fence)
            job = session.get(Job, job_id)
            assert job is not None
            job.status, job.error, job.error_type = status, error, error_type
            done = status in (Status.applied, Status.completed)
            job.stage, job.finished_at = "done" if done else status, utcnow()
            job.percent = 100.0
            if result_version is not None:
                job.result_version = result_version
            for edit in session.scalars(select(Edit).where(Edit.job_id == job_id)):
                if not edit.status.terminal:
                    edit.status, edit.error = status, error

    def job_has_version(self, job_id: int) -> bool:
        with self.sessions() as session:
            query = select(func.count()).select_from(Version).where(Version.job_id == job_id)
            return bool(session.scalar(query))

    # -- edits ------------------------------------------------------------------------------

    def edit(self, edit_id: str) -> Edit | None:
        with self.sessions() as session:
            return session.get(Edit, edit_id)

    def edits_of_job(self, job_id: int) -> list[Edit]:
        with self.sessions() as session:
            query = select(Edit).where(Edit.job_id == job_id).order_by(Edit.position)
            return list(session.scalars(query))

    def edits_by_id(self, ids: Iterable[str]) -> list[Edit]:
        wanted = list(ids)
        with self.sessions() as session:
            found = {e.id: e for e in session.scalars(select(Edit).where(Edit.id.in_(wanted)))}
        return [found[i] for i in wanted]

    def list_edits(
        self, limit: int = 50, offset: int = 0, status: Status | None = None
    ) -> tuple[list[Edit], int]:
        with self.sessions() as session:
            query = select(Edit)
            counting = select(func.count()).select_from(Edit)
            if status is not None:
                query, counting = (
                    query.where(Edit.status == status),
                    counting.where(Edit.status == status),
                )
            rows = session.scalars(
                query.order_by(Edit.job_id.desc(), Edit.position).limit(limit).offset(offset)
            )
            return list(rows), int(session.scalar(counting) or 0)


def live_edits(chain: list[Version]) -> dict[str, int]:
    """Edit id -> the version on `chain` whose patch carries it, for edits still in effect."""
    subtracted = {v.reverts for v in chain if v.reverts is not None}
    live: dict[str, int] = {}
    for version in chain:
        if version.patch_sha256 and version.number not in subtracted and version.reverts is None:
            for edit_id in version.edit_ids:
                live[edit_id] = version.number
    return live
