"""/v1/model, /v1/versions, /v1/rollback: the served weights and their history."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Query, Response
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from editors.model_spec import num_layers

from ...engine.engine import Engine
from ...ledger.schema import JobKind
from ...ledger.store import live_edits
from ...observability import request_id
from ...state import ServiceState
from ..deps import EngineDep, StateDep, authenticated, require
from ..errors import bad_input
from ..jobs_wait import job_answer, publish
from ..limits import check_queue_depth
from ..schemas import MAX_ID, JobOut, ModelOut, RollbackIn, VersionOut
from ..views import version_out

router = APIRouter(prefix="/v1", tags=["model"], dependencies=[Depends(authenticated)])


@router.get("/model", response_model=ModelOut)
async def get_model(state: StateDep, engine: EngineDep, response: Response) -> ModelOut:
    head = await run_in_threadpool(state.ledger.head)
    if head.number != engine.version:  # the swap waits for the requests in flight
        await run_in_threadpool(engine.follow, head.number)
    return await run_in_threadpool(_model_out, state, engine, response)


def _model_out(state: ServiceState, engine: Engine, response: Response) -> ModelOut:
    head = state.ledger.head()
    base = state.ledger.version(0)
    edited = engine.edited_parameters()
    spec = engine.editor.spec
    layers = sorted(
        {
            i
            for i in range(num_layers(engine.model, spec))
            for name in edited
            if name.startswith(f"{spec.layers}.{i}.")
        }
    )
    response.headers["X-Model-Version"] = str(engine.version)
    return ModelOut(
        model=state.settings.model,
        version=engine.version,
        checksum=engine.checksum,
        base_checksum=base.checksum if base else "",
        device=str(next(engine.model.parameters()).device),
        dtype=str(next(engine.model.parameters()).dtype).removeprefix("torch."),
        family=spec.family,
        layers=num_layers(engine.model, spec),
        edited_parameters=edited,
        edited_layers=layers,
        live_edits=len(live_edits(state.ledger.chain(head.number))),
        role=str(state.role),
    )


@router.get("/versions", response_model=list[VersionOut])
def list_versions(
    state: StateDep, limit: int = Query(100, ge=1, le=1000), offset: int = Query(0, ge=0, le=MAX_ID)
) -> list[VersionOut]:
    return [version_out(v) for v in state.ledger.versions(limit, offset)]


@router.post(
    "/rollback",
    response_model=JobOut,
    responses={202: {"model": JobOut}},
    dependencies=[Depends(require("admin"))],
)
async def rollback(body: RollbackIn, state: StateDep, engine: EngineDep) -> JobOut | JSONResponse:
    """Restore the weights of `to_version` exactly (checked against its recorded checksum);
    recorded as a new version whose parent is `to_version`."""
    job_id = await run_in_threadpool(_accept_rollback, body, state)
    return await job_answer(state, job_id, body.wait)


def _accept_rollback(body: RollbackIn, state: ServiceState) -> int:
    if state.ledger.version(body.to_version) is None:
        head = state.ledger.head()
        raise bad_input(
            f"version {body.to_version} does not exist (the head is {head.number})", "to_version"
        )
    check_queue_depth(state)
    job = state.ledger.accept_job(
        JobKind.rollback, {"to_version": body.to_version, "request_id": request_id.get()}
    )
    publish(state, job.id)
    return job.id
