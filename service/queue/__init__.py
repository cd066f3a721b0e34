"""Job queues: they wake the worker; the ledger decides order and status."""

from __future__ import annotations

from .base import JobQueue, QueueUnavailableError
from .local import LocalQueue
from .redis_streams import RedisStreamQueue


def make_queue(redis_url: str | None, consumer: str, name: str = "editserve") -> JobQueue:
    """Redis Streams when a URL is configured, else the in-process queue."""
    if redis_url:
        return RedisStreamQueue(redis_url, consumer, stream=f"{name}:jobs", group=f"{name}-workers")
    return LocalQueue()


__all__ = ["JobQueue", "LocalQueue", "QueueUnavailableError", "RedisStreamQueue", "make_queue"]
