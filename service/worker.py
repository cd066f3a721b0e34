"""The edit worker: while this process holds the writer lease, wakes on queue messages (or
a poll) and runs the ledger's pending jobs in acceptance order; otherwise it stands by. Any
number of processes may run one: the lease makes exactly one of them the writer, and a
standby takes over within a lease period of the writer's death. Messages are acknowledged
only after the jobs have ended."""

from __future__ import annotations

import contextlib
import logging
import threading

from sqlalchemy.exc import SQLAlchemyError

from .engine.engine import Engine
from .engine.lease import WriterLease
from .ledger.lease import StaleWriterError
from .queue.base import JobQueue, Message, QueueUnavailableError

log = logging.getLogger(__name__)

HEARTBEAT_SECONDS = 5.0
BACKOFF_SECONDS = 1.0


class EditWorker:
    def __init__(
        self, engine: Engine, queue: JobQueue, lease: WriterLease, poll_seconds: float = 2.0
    ) -> None:
        self.engine, self.queue, self.lease, self.poll_seconds = engine, queue, lease, poll_seconds
        self.stop_event = threading.Event()
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        """Run in background threads (inside the API process)."""
        self.lease.start()
        for target, name in ((self.run, "edit-worker"), (self._beat, "worker-heartbeat")):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self, timeout: float = 10.0) -> None:
        self.stop_event.set()
        self.queue.wake()
        for thread in self._threads:
            thread.join(timeout)
        self.lease.stop()

    def run(self) -> None:
        while not self.stop_event.is_set():
            token = self.lease.token
            if token is None:  # a standby: the follower keeps the weights at the head
                self.lease.wait_for_lease(self.poll_seconds)
                continue
            messages: list[Message] = []
            try:
                messages = self.queue.receive(self.poll_seconds)
            except QueueUnavailableError as exc:
                log.warning("queue unavailable (%s); polling the ledger", exc)
                self.stop_event.wait(BACKOFF_SECONDS)
            try:
                self.drain(token)
            except StaleWriterError as exc:
                log.warning("standing down: %s", exc)
                self.lease.lost(token)
                self.engine.follow()  # back to the head the new writer records
                continue
            except SQLAlchemyError:
                log.exception("ledger unavailable; will retry")
                self.stop_event.wait(BACKOFF_SECONDS)
                continue
            try:
                self.queue.ack(messages)
            except QueueUnavailableError:
                log.warning("could not acknowledge %d message(s)", len(messages))

    def drain(self, token: int | None = None) -> None:
        """Run every pending job, oldest first, whatever order the messages came in, while
        the lease is still `token`'s."""
        while not self.stop_event.is_set() and self.lease.token == token:
            job = self.engine.ledger.next_pending_job()
            if job is None:
                return
            self.engine.run_job(job.id, token)

    def _beat(self) -> None:
        while not self.stop_event.is_set():
            with contextlib.suppress(QueueUnavailableError):
                self.queue.heartbeat()
            self.stop_event.wait(HEARTBEAT_SECONDS)
