"""/v1/edits: accept edits, list and read them, revert one."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Query, Response
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from editors.methods import METHODS

from ...ledger.schema import JobKind, Status
from ...ledger.store import NewEdit, live_edits
from ...observability import request_id
from ...requests import request_record
from ...state import ServiceState
from ..deps import EngineDep, StateDep, authenticated, require
from ..errors import bad_input, conflict, not_found
from ..jobs_wait import job_answer, publish
from ..limits import check_queue_depth
from ..schemas import MAX_ID, Accepted, EditList, EditOut, EditsIn, JobOut, RevertIn
from ..validation import validated_edits
from ..views import edit_out

router = APIRouter(prefix="/v1/edits", tags=["edits"], dependencies=[Depends(authenticated)])


@router.post("", status_code=202, response_model=Accepted, dependencies=[Depends(require("edit"))])
def post_edits(body: EditsIn, state: StateDep, engine: EngineDep) -> Accepted:
    """Validate, record in the ledger (`queued`), enqueue; 202 with the job and edit ids."""
    requests, method, overrides = validated_edits(body, engine, state.settings)
    if METHODS[method].writes_weights and (fixed := engine.fixed_codebook_edits()):
        raise conflict(
            f"edit {fixed[0]} is codebook entries recorded without their contexts, which "
            f"cannot follow a {method} change of the weights; revert it first (mode=rebase)",
            "method",
        )
    check_queue_depth(state)
    job, ids = state.ledger.accept_edits(
        [NewEdit(request_record(r), method, overrides) for r in requests],
        {"method": method, "request_id": request_id.get()},
    )
    publish(state, job.id)
    return Accepted(job_id=job.id, edit_ids=ids, job_url=f"/v1/jobs/{job.id}")


@router.get("", response_model=EditList)
def list_edits(
    state: StateDep,
    engine: EngineDep,
    response: Response,
    limit: int = Query(50, ge=1, le=1000),
    offset: int = Query(0, ge=0, le=MAX_ID),
    status: Status | None = None,
) -> EditList:
    head = state.ledger.head()
    live = live_edits(state.ledger.chain(head.number))
    rows, total = state.ledger.list_edits(limit, offset, status)
    response.headers["X-Model-Version"] = str(head.number)
    return EditList(edits=[edit_out(e, live) for e in rows], total=total, model_version=head.number)


@router.get("/{edit_id}", response_model=EditOut)
def get_edit(edit_id: str, state: StateDep, response: Response) -> EditOut:
    edit = state.ledger.edit(edit_id)
    if edit is None:
        raise not_found(f"no edit {edit_id}", "edit_id")
    head = state.ledger.head()
    response.headers["X-Model-Version"] = str(head.number)
    return edit_out(edit, live_edits(state.ledger.chain(head.number)))


@router.post(
    "/{edit_id}/revert",
    response_model=JobOut,
    responses={202: {"model": JobOut}},
    dependencies=[Depends(require("admin"))],
)
async def revert_edit(
    edit_id: str, body: RevertIn, state: StateDep, engine: EngineDep
) -> JobOut | JSONResponse:
    """Undo one edit: `rebase` recomputes the later edits without it; `subtract` removes
    only its patch (fast, approximate). Both append versions to the ledger."""
    job_id = await run_in_threadpool(_accept_revert, edit_id, body, state)
    return await job_answer(state, job_id, body.wait)


def _accept_revert(edit_id: str, body: RevertIn, state: ServiceState) -> int:
    edit = state.ledger.edit(edit_id)
    if edit is None:
        raise not_found(f"no edit {edit_id}", "edit_id")
    if edit.status != Status.applied:
        raise conflict(f"edit {edit_id} is {edit.status}, not applied", "edit_id")
    head = state.ledger.head()
    live = live_edits(state.ledger.chain(head.number))
    if edit_id not in live:
        raise conflict(f"edit {edit_id} is not in effect at version {head.number}", "edit_id")
    if body.mode == "subtract":
        if edit.method in METHODS and not METHODS[edit.method].subtractable:
            raise bad_input(
                f"edit {edit_id} is a {edit.method} edit (codebook entries or added neurons, "
                "not weight sums), which a subtraction "
                "cannot take back; use mode=rebase",
                "mode",
            )
        carrier = state.ledger.version(live[edit_id])
        if carrier is not None and len(carrier.edit_ids) > 1:
            raise bad_input(
                f"edit {edit_id} was applied in a batch of {len(carrier.edit_ids)}; "
                "subtract removes whole patches only, use mode=rebase",
                "mode",
            )
    check_queue_depth(state)
    job = state.ledger.accept_job(
        JobKind.revert, {"edit_id": edit_id, "mode": body.mode, "request_id": request_id.get()}
    )
    publish(state, job.id)
    return job.id
