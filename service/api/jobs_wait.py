"""Waiting on a ledger job from an async route."""

from __future__ import annotations

import asyncio
import logging
import time

from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from ..ledger.schema import Job
from ..queue import QueueUnavailableError
from ..state import ServiceState
from .schemas import JobOut
from .views import job_out

log = logging.getLogger(__name__)


def publish(state: ServiceState, job_id: int) -> None:
    """Wake the worker; if the queue is down the ledger still holds the job (it is polled)."""
    try:
        state.queue.publish(job_id)
    except QueueUnavailableError as exc:
        log.warning("job %s recorded but not enqueued (%s); the worker will poll it", job_id, exc)


# how long reading an ended job waits for this process to serve the version it recorded
SERVED_WAIT_SECONDS = 5.0


def read_job(state: ServiceState, job_id: int) -> Job | None:
    """The job; one that has recorded a version is answered once this process serves that
    version (or after SERVED_WAIT_SECONDS), so a client that sees `applied` and then
    generates gets the edited model from whichever process it asks."""
    job = state.ledger.job(job_id)
    engine = state.engine
    served = engine is not None and engine.state.ready
    if served and job is not None and job.status.terminal and job.result_version is not None:
        assert engine is not None
        engine.wait_served(job.result_version, SERVED_WAIT_SECONDS)
    return job


async def wait_for_job(state: ServiceState, job_id: int, timeout: float) -> Job:
    deadline = time.monotonic() + timeout
    while True:
        job = await run_in_threadpool(read_job, state, job_id)
        assert job is not None
        if job.status.terminal or time.monotonic() >= deadline:
            return job
        await asyncio.sleep(0.05)


async def job_answer(state: ServiceState, job_id: int, wait: bool) -> JobOut | JSONResponse:
    """The job when it has ended (200), or as it stands after the wait (202)."""
    job = await wait_for_job(state, job_id, state.settings.job_wait_seconds if wait else 0.0)
    out = job_out(job, [])
    if not job.status.terminal:
        return JSONResponse(out.model_dump(mode="json"), status_code=202)
    return out
