"""The edit worker: wakes on queue messages (or a poll) and runs the ledger's pending jobs
in acceptance order. Messages are acknowledged only after the jobs have ended."""

from __future__ import annotations

import contextlib
import logging
import threading

from sqlalchemy.exc import SQLAlchemyError

from .engine.engine import Engine
from .queue.base import JobQueue, Message, QueueUnavailableError

log = logging.getLogger(__name__)

HEARTBEAT_SECONDS = 5.0
BACKOFF_SECONDS = 1.0


class EditWorker:
    def __init__(self, engine: Engine, queue: JobQueue, poll_seconds: float = 2.0) -> None:
        self.engine, self.queue, self.poll_seconds = engine, queue, poll_seconds
        self.stop_event = threading.Event()
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        """Run in background threads (inside the API process)."""
        for target, name in ((self.run, "edit-worker"), (self._beat, "worker-heartbeat")):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self, timeout: float = 10.0) -> None:
        self.stop_event.set()
        self.queue.wake()
        for thread in self._threads:
            thread.join(timeout)

    def run(self) -> None:
        while not self.stop_event.is_set():
            messages: list[Message] = []
            try:
                messages = self.queue.receive(self.poll_seconds)
            except QueueUnavailableError as exc:
                log.warning("queue unavailable (%s); polling the ledger", exc)
                self.stop_event.wait(BACKOFF_SECONDS)
            try:
                self.drain()
            except SQLAlchemyError:
                log.exception("ledger unavailable; will retry")
                self.stop_event.wait(BACKOFF_SECONDS)
                continue
            try:
                self.queue.ack(messages)
            except QueueUnavailableError:
                log.warning("could not acknowledge %d message(s)", len(messages))

    def drain(self) -> None:
        """Run every pending job, oldest first, whatever order the messages came in."""
        while not self.stop_event.is_set():
            job = self.engine.ledger.next_pending_job()
            if job is None:
                return
            self.engine.run_job(job.id)

    def _beat(self) -> None:
        while not self.stop_event.is_set():
            with contextlib.suppress(QueueUnavailableError):
                self.queue.heartbeat()
            self.stop_event.wait(HEARTBEAT_SECONDS)
