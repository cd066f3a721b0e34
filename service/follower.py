"""Keeps this process's weights at the ledger head: woken by a new-version notice (Redis
pub/sub) the moment the writer commits, with a poll of the ledger as the fallback. Each move
applies only what changed (see engine/replayer.py); the writer's own moves are no-ops."""

from __future__ import annotations

import logging
import time

from .background import BackgroundLoop
from .engine.engine import Engine
from .queue.notices import VersionNotices

log = logging.getLogger(__name__)


class HeadFollower(BackgroundLoop):
    thread_name = "head-follower"

    def __init__(
        self, engine: Engine, notices: VersionNotices | None, poll_seconds: float = 1.0
    ) -> None:
        super().__init__()
        self.engine, self.notices, self.poll_seconds = engine, notices, poll_seconds

    def run(self) -> None:
        while not self.stop_event.is_set():
            began = time.monotonic()
            heard = self.notices.wait(self.poll_seconds) if self.notices is not None else None
            if heard is None:  # nothing heard (or no Redis): poll at the poll interval
                self.stop_event.wait(max(0.0, self.poll_seconds - (time.monotonic() - began)))
            elif heard <= self.engine.version:
                continue  # an announcement of what is already served (the writer's own)
            if not self.stop_event.is_set():
                self.engine.follow()
