"""Job progress into the ledger, throttled: the stage and percent a client polls or streams."""

from __future__ import annotations

import logging
import time

from ..ledger.store import Ledger

log = logging.getLogger(__name__)


class JobProgress:
    def __init__(self, ledger: Ledger, job_id: int, min_interval: float = 0.5) -> None:
        self.ledger, self.job_id, self.min_interval = ledger, job_id, min_interval
        self.stage, self.percent, self._last = "", 0.0, 0.0
        self.span = (0.0, 1.0)  # the part of the job the current callbacks cover

    def __call__(self, fraction: float, stage: str) -> None:
        low, high = self.span
        percent = 100.0 * (low + (high - low) * min(max(fraction, 0.0), 1.0))
        now = time.monotonic()
        if stage == self.stage and now - self._last < self.min_interval:
            return
        self.stage, self.percent, self._last = stage, percent, now
        try:
            self.ledger.progress(self.job_id, stage, percent)
        except Exception:  # progress is advisory: a write failure must not fail the edit
            log.warning("could not record progress of job %s", self.job_id, exc_info=True)
