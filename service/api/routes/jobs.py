"""/v1/jobs: a job's status and progress, polled or streamed (SSE); cancel."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Depends, Path
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from ...auth import Principal
from ...ledger.schema import JobKind
from ...state import ServiceState
from ..deps import StateDep, authenticated
from ..errors import ApiError, conflict, not_found
from ..jobs_wait import read_job
from ..schemas import MAX_ID, JobOut
from ..views import job_out

JobId = Annotated[int, Path(ge=1, le=MAX_ID)]

router = APIRouter(prefix="/v1/jobs", tags=["jobs"], dependencies=[Depends(authenticated)])


def _job(state: ServiceState, job_id: int) -> JobOut:
    job = read_job(state, job_id)
    if job is None:
        raise not_found(f"no job {job_id}", "job_id")
    return job_out(job, [e.id for e in state.ledger.edits_of_job(job_id)])


@router.get("/{job_id}", response_model=JobOut)
def get_job(job_id: JobId, state: StateDep) -> JobOut:
    return _job(state, job_id)


# the scope a key needs to cancel a job: the one that may start it
CANCEL_SCOPE = {
    JobKind.edit: "edit",
    JobKind.rollback: "admin",
    JobKind.revert: "admin",
    JobKind.evaluate: "evaluate",
}


@router.post("/{job_id}/cancel", status_code=202, response_model=JobOut)
def cancel_job(
    job_id: JobId, state: StateDep, principal: Annotated[Principal, Depends(authenticated)]
) -> JobOut:
    """Cancel a queued or running job. A queued one ends `cancelled` at once; a running
    one stops at its next step and records nothing (an evaluation keeps what it measured).
    A job that already ended gets 409."""
    job = state.ledger.job(job_id)
    if job is None:
        raise not_found(f"no job {job_id}", "job_id")
    scope = CANCEL_SCOPE[job.kind]
    if not principal.allows(scope):
        raise ApiError(403, f"this key lacks the {scope!r} scope", "forbidden", headers={})
    job = state.ledger.request_cancel(job_id)
    assert job is not None
    if job.status.terminal and job.status != "cancelled":
        raise conflict(f"job {job_id} already ended {job.status}", "job_id")
    return _job(state, job_id)


@router.get("/{job_id}/events", response_class=StreamingResponse)
def job_events(job_id: JobId, state: StateDep) -> StreamingResponse:
    """Server-sent events: `progress` whenever stage or percent change, then `done`; after
    EDITSERVE_JOB_WAIT_SECONDS a `timeout` event ends the stream (reconnect to go on)."""
    _job(state, job_id)  # 404 before the stream starts
    deadline = time.monotonic() + state.settings.job_wait_seconds

    async def events() -> AsyncIterator[str]:
        last = None
        while True:
            if time.monotonic() > deadline:
                yield "event: timeout\ndata: {}\n\n"
                return
            job = await run_in_threadpool(_job, state, job_id)
            seen = (job.status, job.stage, job.percent)
            if seen != last:
                last = seen
                kind = "done" if job.finished_at is not None else "progress"
                yield f"event: {kind}\ndata: {json.dumps(job.model_dump(mode='json'))}\n\n"
                if kind == "done":
                    return
            await asyncio.sleep(0.1)

    return StreamingResponse(events(), media_type="text/event-stream")
