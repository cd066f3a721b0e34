"""Ledger operations. Every state change is one transaction, so a crash leaves either the
old or the new record, never half of one; rows are appended or move forward in status,
never deleted."""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from .schema import (
    Edit,
    EvaluationResult,
    Job,
    JobKind,
    Status,
    Version,
    VersionKind,
    utcnow,
)


class LedgerMismatchError(RuntimeError):
    """The ledger was recorded on other base weights than the ones loaded."""


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


class Ledger:
    def __init__(self, sessions: sessionmaker[Session], model: str) -> None:
        self.sessions = sessions
        self.model = model

    # -- versions ---------------------------------------------------------------------------

    def ensure_base(self, checksum: str) -> Version:
        """Record version 0 (the base weights) on first start; refuse other base weights."""
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
            elif base.checksum != checksum:
                raise LedgerMismatchError(
                    f"the ledger's base weights ({base.model}, checksum {base.checksum[:12]}) "
                    f"differ from the loaded model ({self.model}, checksum {checksum[:12]})"
                )
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
    ) -> Version:
        """Append a version and, in the same transaction, mark its edits (and job) applied.

        The number is head + 1; two writers racing for it collide on the primary key.
        """
        with self.sessions.begin() as session:
            number = (session.scalar(select(func.max(Version.number))) or 0) + 1
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
            now = utcnow()
            for edit_id in applied_edits:
                edit = session.get(Edit, edit_id)
                assert edit is not None
                if edit.status != Status.applied:
                    edit.status, edit.version, edit.applied_at = Status.applied, number, now
                if diagnostics and edit_id in diagnostics:
                    edit.diagnostics = diagnostics[edit_id]
            job = session.get(Job, job_id)
            assert job is not None
            job.result_version = number
            if finish_job:
                job.status, job.stage, job.percent, job.finished_at = (
                    Status.applied,
                    "done",
                    100.0,
                    now,
                )
            return version

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

    def set_job_result(self, job_id: int, result: dict[str, Any]) -> None:
        with self.sessions.begin() as session:
            job = session.get(Job, job_id)
            assert job is not None
            job.result = result

    def request_cancel(self, job_id: int) -> Job | None:
        """Ask a queued or running job to stop; a queued one is cancelled at once."""
        with self.sessions.begin() as session:
            job = session.get(Job, job_id)
            if job is None or job.status.terminal:
                return job
            job.cancel_requested = True
            if job.status == Status.queued:
                job.status, job.stage, job.finished_at = Status.cancelled, "cancelled", utcnow()
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

    def start_job(self, job_id: int) -> Job:
        with self.sessions.begin() as session:
            job = session.get(Job, job_id)
            assert job is not None
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
    ) -> None:
        """End a job; its edits that did not apply take the same status and error."""
        with self.sessions.begin() as session:
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
