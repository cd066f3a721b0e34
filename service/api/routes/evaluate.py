"""/v1/evaluate: score cases (or earlier edits' requests) against the current model."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Response
from starlette.concurrency import run_in_threadpool

from editors.requests import EditRequest

from ...engine.engine import Engine
from ...requests import request_from_record
from ...state import ServiceState
from ..deps import EngineDep, StateDep, require
from ..errors import bad_input, not_found
from ..schemas import EvaluateIn, EvaluateOut
from ..validation import checked_request

router = APIRouter(prefix="/v1", tags=["evaluate"], dependencies=[Depends(require("evaluate"))])


@router.post("/evaluate", response_model=EvaluateOut)
async def evaluate(
    body: EvaluateIn, state: StateDep, engine: EngineDep, response: Response
) -> EvaluateOut:
    """Reliability, generalization, locality, portability (token-level, EasyEdit) and
    efficacy, paraphrase, neighborhood (CounterFact), with the base weights' as baseline."""
    if (body.cases is None) == (body.edit_ids is None):
        raise bad_input("give exactly one of `cases` or `edit_ids`", "cases")
    count = len(body.cases if body.cases is not None else body.edit_ids or [])
    if not 0 < count <= state.settings.max_evaluate_cases:
        limit = state.settings.max_evaluate_cases
        raise bad_input(
            f"give 1 to {limit} cases", "cases" if body.cases is not None else "edit_ids"
        )
    requests = await run_in_threadpool(_requests, body, state, engine)
    version, metrics, baseline = await engine.evaluate(requests, body.baseline)
    response.headers["X-Model-Version"] = str(version)
    return EvaluateOut(model_version=version, cases=count, metrics=metrics, baseline=baseline)


def _requests(body: EvaluateIn, state: ServiceState, engine: Engine) -> list[EditRequest]:
    """The cases checked, or the stored requests of the named edits (a ledger read)."""
    if body.cases is not None:
        return [
            checked_request(f"cases.{index}.", case, engine, state.settings)
            for index, case in enumerate(body.cases)
        ]
    requests = []
    for index, edit_id in enumerate(body.edit_ids or []):
        edit = state.ledger.edit(edit_id)
        if edit is None:
            raise not_found(f"no edit {edit_id}", f"edit_ids.{index}")
        requests.append(request_from_record(edit.request))
    return requests
