"""ORM mappings of the ledger (SQLAlchemy 2). Alembic's migrations must match these;
`tests/test_migrations.py` runs `alembic check` to prove it."""

from __future__ import annotations

import enum
from datetime import UTC, datetime
from typing import Any, ClassVar

from sqlalchemy import (
    JSON,
    Boolean,
    DateTime,
    Enum,
    Float,
    ForeignKey,
    Integer,
    LargeBinary,
    String,
    Text,
    false,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


def utcnow() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    type_annotation_map: ClassVar[dict[Any, Any]] = {dict[str, Any]: JSON, list[Any]: JSON}


class Status(enum.StrEnum):
    queued = "queued"
    running = "running"
    applied = "applied"
    rejected = "rejected"  # the request cannot be edited (the reason is recorded)
    failed = "failed"  # an unexpected error (the error is recorded)
    completed = "completed"  # an evaluation that ran to its end
    cancelled = "cancelled"  # an evaluation stopped on request (its results so far kept)

    @property
    def terminal(self) -> bool:
        return self not in (Status.queued, Status.running)


class JobKind(enum.StrEnum):
    edit = "edit"
    rollback = "rollback"
    revert = "revert"
    evaluate = "evaluate"  # a dataset evaluation on a copy of the model; no version


class VersionKind(enum.StrEnum):
    base = "base"
    edit = "edit"
    rollback = "rollback"  # weights equal to an earlier version (no patch)
    revert = "revert"  # subtract: the reverted patch negated; rebase: restart point
    rebase = "rebase"  # an edit recomputed on a history without the reverted one


_status = Enum(Status, name="status", native_enum=False, length=16)


class Job(Base):
    """One unit of work on the model; `id` is the acceptance order."""

    __tablename__ = "jobs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    kind: Mapped[JobKind] = mapped_column(Enum(JobKind, name="job_kind", native_enum=False))
    status: Mapped[Status] = mapped_column(_status, index=True)
    payload: Mapped[dict[str, Any]] = mapped_column(default=dict)
    stage: Mapped[str] = mapped_column(String(64), default="queued")
    percent: Mapped[float] = mapped_column(Float, default=0.0)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    error: Mapped[str | None] = mapped_column(Text)
    error_type: Mapped[str | None] = mapped_column(String(64))
    result_version: Mapped[int | None] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    result: Mapped[dict[str, Any] | None] = mapped_column(JSON)  # what the job produced
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    claimed_by: Mapped[str | None] = mapped_column(String(128))  # the process that ran it last


class EvaluationResult(Base):
    """One measured row of an evaluation job (see editors.evaluation.EvaluationRow)."""

    __tablename__ = "evaluation_results"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id"), index=True)
    kind: Mapped[str] = mapped_column(String(16))
    edits_done: Mapped[int] = mapped_column(Integer)
    case_id: Mapped[str | None] = mapped_column(String(64))
    metrics: Mapped[dict[str, Any]] = mapped_column()
    baseline: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    error: Mapped[str | None] = mapped_column(Text)
    answers: Mapped[dict[str, Any] | None] = mapped_column(JSON)  # a case's answers, as text
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Edit(Base):
    """One accepted fact rewrite; a job carries one edit or a batch."""

    __tablename__ = "edits"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id"), index=True)
    position: Mapped[int] = mapped_column(Integer)  # index within its batch
    method: Mapped[str] = mapped_column(String(32))
    hparams: Mapped[dict[str, Any]] = mapped_column(default=dict)  # the caller's overrides
    request: Mapped[dict[str, Any]] = mapped_column()
    status: Mapped[Status] = mapped_column(_status, index=True)
    error: Mapped[str | None] = mapped_column(Text)
    diagnostics: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    version: Mapped[int | None] = mapped_column(Integer)  # the version that first applied it
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    applied_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class Version(Base):
    """A state of the weights: its parent's weights plus this version's patch, if any.

    The weights of version v are the base plus the patches along v's parent chain, in order.
    A rollback is a version with no patch whose parent is the version rolled back to.
    """

    __tablename__ = "versions"

    number: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    parent: Mapped[int | None] = mapped_column(ForeignKey("versions.number"))
    kind: Mapped[VersionKind] = mapped_column(
        Enum(VersionKind, name="version_kind", native_enum=False)
    )
    job_id: Mapped[int | None] = mapped_column(ForeignKey("jobs.id"), index=True)
    patch_sha256: Mapped[str | None] = mapped_column(String(64))
    checksum: Mapped[str] = mapped_column(String(64))
    edit_ids: Mapped[list[Any]] = mapped_column(default=list)  # edits this patch carries
    reverts: Mapped[int | None] = mapped_column(Integer)  # version whose patch is undone
    model: Mapped[str] = mapped_column(String(256))
    note: Mapped[str] = mapped_column(Text, default="")
    seconds: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class ApiKey(Base):
    """An API key: only its sha256 is stored; `prefix` identifies it in lists and logs."""

    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    name: Mapped[str] = mapped_column(String(128))
    prefix: Mapped[str] = mapped_column(String(16), unique=True, index=True)
    secret_sha256: Mapped[str] = mapped_column(String(64))
    scopes: Mapped[list[Any]] = mapped_column(default=list)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class ConsoleSession(Base):
    """A signed-in web console: the cookie's token is stored only as its sha256. The session
    acts with its key's scopes and ends when the key is revoked or `expires_at` passes."""

    __tablename__ = "console_sessions"

    token_sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    key_id: Mapped[str] = mapped_column(ForeignKey("api_keys.id", ondelete="CASCADE"), index=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)


class Lineage(Base):
    """The one row that makes the ledger a single chain with a single writer.

    `head` is the newest version: a version is inserted only by moving `head` from the
    version it was computed on (compare-and-set), so two writers cannot both extend it.
    `token` is the writer lease's fencing token: it grows at every take-over, and every write
    a writer makes checks it, so a writer that lost its lease commits nothing. The holder
    bumps `beat` while alive; a standby that sees `beat` stand still for the lease time takes
    over (no clocks compared across machines).
    """

    __tablename__ = "lineage"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    head: Mapped[int] = mapped_column(Integer)
    writer: Mapped[str | None] = mapped_column(String(128))
    token: Mapped[int] = mapped_column(Integer, default=0)
    beat: Mapped[int] = mapped_column(Integer, default=0)
    renewed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class Blob(Base):
    """A patch blob kept in the ledger database, so a replica needs only the database URL."""

    __tablename__ = "blobs"

    sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    data: Mapped[bytes] = mapped_column(LargeBinary)
    size: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
