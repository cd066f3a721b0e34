"""/v1/evaluations: dataset evaluation jobs, their results as JSON or CSV, and the report."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Query
from fastapi.responses import HTMLResponse, PlainTextResponse
from starlette.concurrency import run_in_threadpool

from editors.datasets import DatasetError
from editors.errors import EditError
from editors.evaluation import EvaluationPlan, EvaluationRow, summarize

from ...evaluations.jobs import cases_of, row_of, where_stopped
from ...evaluations.report import to_csv, to_html
from ...ledger.schema import Job, JobKind, Status
from ...requests import request_record
from ...state import ServiceState
from ..deps import EngineDep, StateDep, require
from ..errors import bad_input, from_edit_error, not_found
from ..schemas import MAX_ID, EvaluationIn, EvaluationOut
from ..validation import checked_method, checked_request

JobId = Annotated[int, Path(ge=1, le=MAX_ID)]

router = APIRouter(
    prefix="/v1/evaluations", tags=["evaluations"], dependencies=[Depends(require("evaluate"))]
)


def _source(body: EvaluationIn, state: ServiceState, engine: Any) -> dict[str, Any]:
    given = [name for name in ("dataset", "records", "cases") if getattr(body, name) is not None]
    if len(given) != 1:
        raise bad_input("give exactly one of `dataset`, `records` or `cases`", "dataset")
    if body.cases is not None:
        checked = [
            checked_request(f"cases.{i}.", c, engine, state.settings)
            for i, c in enumerate(body.cases)
        ]
        return {"cases": [request_record(r) for r in checked]}
    if body.records is not None:
        return {"records": body.records, "format": body.format}
    if body.count > state.settings.max_evaluation_cases:
        limit = state.settings.max_evaluation_cases
        raise bad_input(f"at most {limit} cases per evaluation", "count")
    return {"dataset": body.dataset, "split": body.split, "count": body.count, "start": body.start}


def _check_cases(source: dict[str, Any], state: ServiceState) -> int:
    try:
        cases = cases_of(source, state.settings)
    except DatasetError as exc:
        field = exc.field or "dataset"
        if "records" in source:
            field = "records" if exc.record is None else f"records.{exc.record}.{field}"
        raise bad_input(str(exc), field, "dataset_error") from exc
    if not cases:
        raise bad_input("no cases in the range asked for", "start")
    if len(cases) > state.settings.max_evaluation_cases:
        limit = state.settings.max_evaluation_cases
        raise bad_input(f"at most {limit} cases per evaluation", "count")
    return len(cases)


@router.post("", status_code=202, response_model=EvaluationOut)
async def create_evaluation(
    body: EvaluationIn, state: StateDep, engine: EngineDep
) -> EvaluationOut:
    """Queue an evaluation; it runs on a copy of the model, so serving goes on."""
    try:
        plan = EvaluationPlan(
            method=body.method,
            protocol=body.protocol,
            batch_size=body.batch_size,
            checkpoint_every=body.checkpoint_every,
            hparams=dict(body.hparams),
            fluency=body.fluency,
        )
    except EditError as exc:
        raise from_edit_error(exc) from exc
    checked_method(plan.method, plan.hparams, engine)
    source = _source(body, state, engine)
    count = await run_in_threadpool(_check_cases, source, state)
    payload = {"source": source, "plan": plan.to_dict(), "cases": count, "at_head": body.at_head}
    job = await run_in_threadpool(state.ledger.accept_job, JobKind.evaluate, payload)
    return _out(job, state)


@router.get("", response_model=list[EvaluationOut])
def list_evaluations(
    state: StateDep,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    offset: Annotated[int, Query(ge=0, le=MAX_ID)] = 0,
) -> list[EvaluationOut]:
    return [
        _out(job, state, rows=False) for job in state.ledger.jobs(JobKind.evaluate, limit, offset)
    ]


@router.get("/{job_id}", response_model=EvaluationOut)
def get_evaluation(job_id: JobId, state: StateDep) -> EvaluationOut:
    return _out(_job(state, job_id), state)


@router.post("/{job_id}/cancel", status_code=202, response_model=EvaluationOut)
def cancel_evaluation(job_id: JobId, state: StateDep) -> EvaluationOut:
    """Stop the run at its next edit; what it measured so far is kept."""
    _job(state, job_id)
    job = state.ledger.request_cancel(job_id)
    assert job is not None
    return _out(job, state)


@router.get("/{job_id}/results")
def evaluation_results(
    job_id: JobId,
    state: StateDep,
    kind: Annotated[str | None, Query(pattern="^(baseline|case|checkpoint|final)$")] = None,
) -> list[dict[str, Any]]:
    """Every recorded row (or those of one `kind`), each metric beside its baseline."""
    return [r.to_dict() for r in _rows(state, job_id) if kind is None or r.kind == kind]


@router.get("/{job_id}/results.csv", response_class=PlainTextResponse)
def evaluation_csv(job_id: JobId, state: StateDep) -> PlainTextResponse:
    return PlainTextResponse(to_csv(_rows(state, job_id)), media_type="text/csv")


@router.get("/{job_id}/report", response_class=HTMLResponse)
def evaluation_report(job_id: JobId, state: StateDep) -> HTMLResponse:
    job = _job(state, job_id)
    rows = _rows(state, job_id)
    title = f"Evaluation {job_id}: {_describe(job.payload['source'])}"
    return HTMLResponse(to_html(title, _summary(job, rows, state), rows))


def _job(state: ServiceState, job_id: int) -> Job:
    job = state.ledger.job(job_id)
    if job is None or job.kind != JobKind.evaluate:
        raise not_found(f"no evaluation {job_id}", "job_id")
    return job


def _rows(state: ServiceState, job_id: int) -> list[EvaluationRow]:
    _job(state, job_id)
    return [row_of(r) for r in state.ledger.evaluation_results(job_id)]


def _describe(source: dict[str, Any]) -> str:
    if "dataset" in source:
        split = source.get("split") or "default split"
        return f"{source['dataset']} {split}, {source['count']} cases from {source['start']}"
    return "uploaded records" if "records" in source else "cases given with the request"


def _summary(job: Job, rows: list[EvaluationRow], state: ServiceState) -> dict[str, Any]:
    """The run's own summary when it ended normally; else one rebuilt from its rows."""
    if job.result is not None:
        return job.result
    stopped = job.error if job.status.terminal else None
    if not stopped:
        running = job.status == Status.running
        stopped = f"running: {where_stopped(state.ledger, job.id)}" if running else "queued"
    return summarize(job.payload["plan"], job.payload["cases"], rows, stopped)


def _out(job: Job, state: ServiceState, rows: bool = True) -> EvaluationOut:
    summary = job.result
    if summary is None and rows:
        summary = _summary(job, [row_of(r) for r in state.ledger.evaluation_results(job.id)], state)
    base = f"/v1/evaluations/{job.id}"
    return EvaluationOut(
        id=job.id,
        status=str(job.status),
        stage=job.stage,
        percent=job.percent,
        source={k: v for k, v in job.payload["source"].items() if k not in ("records", "cases")},
        plan=job.payload["plan"],
        cases=job.payload["cases"],
        error=job.error,
        summary=summary,
        results_url=f"{base}/results",
        csv_url=f"{base}/results.csv",
        report_url=f"{base}/report",
        created_at=job.created_at,
        finished_at=job.finished_at,
    )
