"""Job progress into the ledger, throttled: the stage and percent a client polls or streams.

Progress is also where a running job learns that it must stop: each report (every step of
an edit's optimisation) checks, at most every `check_interval` seconds, whether a cancel
was asked for, and whether the job has run past its time limit.
"""

from __future__ import annotations

import logging
import time

from ..ledger.store import JobCancelledError, Ledger

log = logging.getLogger(__name__)

__all__ = ["JobCancelledError", "JobProgress", "JobTimeLimitError"]


class JobTimeLimitError(Exception):
    """The job ran past its time limit and was stopped; it recorded nothing."""


class JobProgress:
    def __init__(
        self,
        ledger: Ledger,
        job_id: int,
        min_interval: float = 0.5,
        time_limit_seconds: float | None = None,
        check_interval: float | None = 0.25,
    ) -> None:
        """`check_interval` None: progress never stops the job (an evaluation stops between
        cases by itself, keeping what it measured)."""
        self.ledger, self.job_id, self.min_interval = ledger, job_id, min_interval
        self.stage, self.percent, self._last = "", 0.0, 0.0
        self.span = (0.0, 1.0)  # the part of the job the current callbacks cover
        self.time_limit_seconds, self.check_interval = time_limit_seconds, check_interval
        self.started, self._checked = time.monotonic(), 0.0

    def __call__(self, fraction: float, stage: str) -> None:
        low, high = self.span
        percent = 100.0 * (low + (high - low) * min(max(fraction, 0.0), 1.0))
        now = time.monotonic()
        if self.check_interval is not None and now - self._checked >= self.check_interval:
            self.check()
        if stage == self.stage and now - self._last < self.min_interval:
            return
        self.stage, self.percent, self._last = stage, percent, now
        try:
            self.ledger.progress(self.job_id, stage, percent)
        except Exception:  # progress is advisory: a write failure must not fail the edit
            log.warning("could not record progress of job %s", self.job_id, exc_info=True)

    def check(self) -> None:
        """Raise when the job must stop: cancelled, or past its time limit."""
        now = time.monotonic()
        self._checked = now
        limit = self.time_limit_seconds
        if limit is not None and now - self.started > limit:
            raise JobTimeLimitError(f"stopped after its time limit of {limit:g} s")
        try:
            cancelled = self.ledger.cancel_requested(self.job_id)
        except Exception:  # the ledger away: the commit will find out
            log.warning("could not read the cancel flag of job %s", self.job_id, exc_info=True)
            return
        if cancelled:
            raise JobCancelledError(f"job {self.job_id} was cancelled")
