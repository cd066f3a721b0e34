"""The queue interface the API publishes to and the worker consumes from."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


class QueueUnavailableError(RuntimeError):
    """The queue's server cannot be reached; the ledger still holds every accepted job."""


@dataclass(frozen=True)
class Message:
    id: str
    job_id: int


class JobQueue(Protocol):
    def publish(self, job_id: int) -> None: ...

    def receive(self, timeout: float) -> list[Message]:
        """Messages for this consumer; waits up to `timeout` seconds when there are none."""
        ...

    def ack(self, messages: list[Message]) -> None: ...

    def heartbeat(self) -> None: ...

    def wake(self) -> None:
        """End a `receive` that is waiting, where the queue can (a stopping worker)."""
        ...

    def ping(self) -> bool: ...

    def close(self) -> None: ...
