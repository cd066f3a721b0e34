"""Ledger rows as API bodies."""

from __future__ import annotations

from ..ledger.schema import Edit, Job, Version
from .schemas import EditOut, JobOut, VersionOut


def edit_out(edit: Edit, live: dict[str, int]) -> EditOut:
    return EditOut(
        id=edit.id,
        job_id=edit.job_id,
        position=edit.position,
        method=edit.method,
        hparams=edit.hparams,
        request=edit.request,
        status=str(edit.status),
        error=edit.error,
        diagnostics=edit.diagnostics,
        version=edit.version,
        live=edit.id in live,
        live_version=live.get(edit.id),
        created_at=edit.created_at,
        applied_at=edit.applied_at,
    )


def job_out(job: Job, edit_ids: list[str]) -> JobOut:
    return JobOut(
        id=job.id,
        kind=str(job.kind),
        status=str(job.status),
        stage=job.stage,
        percent=job.percent,
        payload=job.payload,
        attempts=job.attempts,
        error=job.error,
        error_type=job.error_type,
        result_version=job.result_version,
        result=job.result if job.kind != "evaluate" else None,
        edit_ids=edit_ids,
        created_at=job.created_at,
        started_at=job.started_at,
        finished_at=job.finished_at,
    )


def version_out(version: Version) -> VersionOut:
    return VersionOut(
        number=version.number,
        parent=version.parent,
        kind=str(version.kind),
        job_id=version.job_id,
        patch_sha256=version.patch_sha256,
        checksum=version.checksum,
        edit_ids=list(version.edit_ids),
        reverts=version.reverts,
        note=version.note,
        created_at=version.created_at,
    )
