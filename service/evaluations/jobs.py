"""Evaluation jobs: accepted into the ledger like edits, run one at a time by their own
worker thread on a copy of the model, so edits and /generate go on meanwhile.

Every measured row is written to the ledger database as soon as it exists; a run that
stops (cancelled, failed, or its process killed) keeps its rows and says where it stopped.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from sqlalchemy.exc import SQLAlchemyError

from editors.errors import EditError
from editors.evaluation import EvaluationPlan, EvaluationRow, run_evaluation

from ..background import BackgroundLoop
from ..config import Settings
from ..engine.engine import Engine
from ..engine.lease import WriterLease
from ..engine.progress import JobProgress
from ..ledger.lease import StaleWriterError
from ..ledger.schema import Job, Status
from ..ledger.store import Ledger
from ..requests import request_from_record
from .sources import benchmark_cases, uploaded_cases

log = logging.getLogger(__name__)


def cases_of(source: dict[str, Any], settings: Settings) -> list[Any]:
    """The cases an evaluation payload's `source` names (checked again at acceptance)."""
    if "dataset" in source:
        return benchmark_cases(
            settings.benchmark_dir,
            source["dataset"],
            source.get("split"),
            source.get("count"),
            source.get("start", 0),
        )
    if "records" in source:
        return uploaded_cases(source["records"], source.get("format"))
    return [request_from_record(case) for case in source["cases"]]


def row_of(record: Any) -> EvaluationRow:
    return EvaluationRow(
        record.kind,
        record.edits_done,
        record.metrics,
        record.baseline,
        record.case_id,
        record.error,
        record.answers,
    )


def where_stopped(ledger: Ledger, job_id: int) -> str:
    rows = ledger.evaluation_results(job_id)
    done = max((r.edits_done for r in rows), default=0)
    return f"after {done} edited cases and {len(rows)} recorded result rows"


class EvaluationWorker(BackgroundLoop):
    """Runs evaluation jobs in the process that holds the writer lease (so two processes
    never run, or declare interrupted, the same job); its ledger writes carry the token."""

    thread_name = "evaluation-worker"

    def __init__(self, engine: Engine, settings: Settings, lease: WriterLease) -> None:
        super().__init__()
        self.engine, self.settings, self.ledger = engine, settings, engine.ledger
        self.lease = lease
        self.fence: int | None = None

    def run(self) -> None:
        while not self.stop_event.is_set():
            self.fence = self.lease.token
            if self.fence is None:
                self.stop_event.wait(self.settings.queue_poll_seconds)
                continue
            try:
                job = self.ledger.next_pending_job(evaluations=True)
                if job is None:
                    self.stop_event.wait(self.settings.queue_poll_seconds)
                    continue
                self.run_job(job)
            except StaleWriterError as exc:
                log.warning("evaluation worker stands down: %s", exc)
            except SQLAlchemyError:
                log.exception("ledger unavailable; evaluation worker retries")
                self.stop_event.wait(1.0)

    def run_job(self, job: Job) -> None:
        if job.status == Status.running:
            # its process died mid-run: the rows it wrote stand; it is not run again
            stopped = f"interrupted {where_stopped(self.ledger, job.id)}; results kept"
            self.ledger.finish_job(job.id, Status.failed, stopped, "Interrupted", fence=self.fence)
            return
        claimed = self.ledger.start_job(job.id, self.fence, self.engine.jobs.identity)
        if claimed is None:
            return
        job = claimed
        extra = {"job_id": job.id}
        log.info("evaluation job %s started", job.id, extra=extra)
        started = time.perf_counter()
        try:
            status, error, error_type = self._evaluate(job)
        except (SQLAlchemyError, StaleWriterError):
            raise
        except EditError as exc:
            status, error, error_type = Status.rejected, str(exc), type(exc).__name__
        except Exception as exc:
            log.exception("evaluation job %s failed", job.id, extra=extra)
            status, error = Status.failed, f"{exc} ({where_stopped(self.ledger, job.id)})"
            error_type = type(exc).__name__
        self.ledger.finish_job(job.id, status, error, error_type, fence=self.fence)
        seconds = time.perf_counter() - started
        log.info("evaluation job %s %s in %.1f s", job.id, status, seconds, extra=extra)

    def _evaluate(self, job: Job) -> tuple[Status, str | None, str | None]:
        payload = job.payload
        plan = EvaluationPlan(**payload["plan"])
        progress = JobProgress(self.ledger, job.id, check_interval=None)
        progress(0.0, "loading the cases")
        cases = cases_of(payload["source"], self.settings)
        progress(0.0, "copying the model")
        editor = self.engine.sandbox(plan.method, plan.hparams, payload.get("at_head", False))
        try:
            summary, _ = run_evaluation(
                editor,
                cases,
                plan,
                record=lambda row: self.ledger.add_evaluation_result(job.id, row.to_dict()),
                progress=progress,
                should_stop=lambda: (
                    self.stop_event.is_set() or self.ledger.cancel_requested(job.id)
                ),
            )
        finally:
            del editor  # the copy's memory goes back now, not at the next collection
        self.ledger.set_job_result(job.id, summary, self.fence)
        if summary["completed"]:
            return Status.completed, None, None
        if self.stop_event.is_set():
            return Status.failed, f"the worker stopped: {summary['stopped_at']}", "Interrupted"
        return Status.cancelled, summary["stopped_at"], None
