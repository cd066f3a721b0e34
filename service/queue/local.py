"""The in-process queue (embedded default): a condition variable around a list."""

from __future__ import annotations

import itertools
import threading

from .base import Message


class LocalQueue:
    def __init__(self) -> None:
        self._items: list[Message] = []
        self._ready = threading.Condition()
        self._ids = itertools.count(1)

    def publish(self, job_id: int) -> None:
        with self._ready:
            self._items.append(Message(str(next(self._ids)), job_id))
            self._ready.notify_all()

    def receive(self, timeout: float) -> list[Message]:
        with self._ready:
            if not self._items:
                self._ready.wait(timeout)
            items, self._items = self._items, []
            return items

    def ack(self, messages: list[Message]) -> None:
        return None

    def heartbeat(self) -> None:
        return None

    def ping(self) -> bool:
        return True

    def wake(self) -> None:
        with self._ready:
            self._ready.notify_all()

    def close(self) -> None:
        self.wake()
