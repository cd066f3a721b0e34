"""Keeps (or waits for) the writer lease of the ledger, in a thread of its own.

The holder renews the lease a few times per lease period. A standby watches the lease row:
when the holder's beat has stood still for a whole lease period on the standby's own clock
(or nobody holds it), it takes the lease with a compare-and-set and a new fencing token.
Whatever the threads believe, the token decides: every write the writer makes carries it.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from enum import StrEnum

from sqlalchemy.exc import SQLAlchemyError

from ..ledger.lease import Leases, LeaseView

log = logging.getLogger(__name__)


class Role(StrEnum):
    writer = "writer"  # holds the lease: runs the model jobs
    standby = "standby"  # would run them; follows the head until the writer goes
    follower = "follower"  # never writes (EDITSERVE_RUN_WORKER=false); follows the head
    starting = "starting"  # loading the model and replaying the ledger


def process_identity(name: str) -> str:
    return f"{name}@{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


class WriterLease:
    def __init__(self, leases: Leases, me: str, lease_seconds: float = 3.0) -> None:
        self.leases, self.me, self.lease_seconds = leases, me, lease_seconds
        self._token: int | None = None
        self._seen: LeaseView | None = None
        self._seen_since = 0.0
        self._last_renewal = 0.0
        self._changed = threading.Condition()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.holder: str | None = None  # the writer as last seen

    @property
    def token(self) -> int | None:
        return self._token

    @property
    def role(self) -> Role:
        return Role.writer if self._token is not None else Role.standby

    def start(self) -> None:
        """Try once now (a free lease is taken before the service reports ready), then keep
        trying or renewing in the background."""
        try:
            self.tick()
        except SQLAlchemyError as exc:
            log.warning("writer lease: ledger unavailable (%s)", type(exc).__name__)
        self._thread = threading.Thread(target=self._run, name="writer-lease", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop keeping the lease and give it up, so a standby takes over at once."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
        token, self._token = self._token, None
        if token is not None:
            try:
                self.leases.release(token)
            except SQLAlchemyError:
                log.warning("could not release the writer lease (a standby waits it out)")

    def lost(self, token: int) -> None:
        """A write with `token` was refused: this process is no longer the writer."""
        with self._changed:
            if self._token == token:
                log.warning("lost the writer lease (token %s); standing by", token)
                self._token = None
                self._seen = None
                self._changed.notify_all()

    def wait_for_lease(self, timeout: float) -> int | None:
        with self._changed:
            if self._token is None:
                self._changed.wait(timeout)
            return self._token

    def _run(self) -> None:
        step = min(0.5, self.lease_seconds / 6)
        while not self._stop.wait(step):
            try:
                self.tick()
            except SQLAlchemyError as exc:
                log.warning("writer lease: ledger unavailable (%s)", type(exc).__name__)
                self._seen = None  # what was seen before the outage proves nothing now

    def tick(self) -> None:
        now = time.monotonic()
        token = self._token
        if token is not None:
            if now - self._last_renewal >= self.lease_seconds / 3:
                if self.leases.renew(token):
                    self._last_renewal = now
                else:
                    self.lost(token)
            return
        view = self.leases.view()
        if view is None:  # no base version yet
            return
        self.holder = view.writer
        if view != self._seen:
            self._seen, self._seen_since = view, now
        if view.writer is not None and now - self._seen_since < self.lease_seconds:
            return  # held, and its holder was alive within the last lease period
        taken = self.leases.acquire(self.me, view)
        if taken is not None:
            log.info("took the writer lease (token %s, previous writer %s)", taken, view.writer)
            with self._changed:
                self._token, self._last_renewal, self.holder = taken, now, self.me
                self._changed.notify_all()
