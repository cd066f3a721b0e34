"""A thin job queue on Redis Streams with one consumer group.

The worker reads under a stable consumer name, so after a crash it first re-reads its own
pending (delivered, unacknowledged) messages; it claims messages a dead consumer left idle;
it acknowledges a message only after the job has ended in the ledger. A heartbeat key with
a TTL says which workers are alive. Redis losing its data loses only wake-ups: the worker
also polls the ledger, which holds every accepted job.
"""

from __future__ import annotations

import time

import redis
from redis.exceptions import RedisError, ResponseError

from .base import Message, QueueUnavailableError

HEARTBEAT_TTL_SECONDS = 30
CLAIM_IDLE_MS = 120_000


class RedisStreamQueue:
    def __init__(self, url: str, consumer: str, stream: str, group: str) -> None:
        self.client = redis.Redis.from_url(url, socket_timeout=10, socket_connect_timeout=5)
        self.consumer, self.stream, self.group = consumer, stream, group
        self._group_ready = False
        self._own_pending_read = False

    def publish(self, job_id: int) -> None:
        try:
            self.client.xadd(self.stream, {"job_id": str(job_id)}, maxlen=100_000)
        except RedisError as exc:
            raise QueueUnavailableError(f"redis: {exc}") from exc

    def _ensure_group(self) -> None:
        if self._group_ready:
            return
        try:
            self.client.xgroup_create(self.stream, self.group, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        self._group_ready = True

    def receive(self, timeout: float) -> list[Message]:
        try:
            return self._receive(timeout)
        except ResponseError as exc:
            if "NOGROUP" in str(exc):  # Redis restarted empty or was flushed
                self._group_ready = False
                self._own_pending_read = False
                return []
            raise QueueUnavailableError(f"redis: {exc}") from exc
        except RedisError as exc:
            self._group_ready = False
            raise QueueUnavailableError(f"redis: {exc}") from exc

    def _receive(self, timeout: float) -> list[Message]:
        self._ensure_group()
        if not self._own_pending_read:  # what this consumer took before a crash
            self._own_pending_read = True
            pending = self._read("0", block_ms=None)
            if pending:
                return pending
        claimed = self.client.xautoclaim(
            self.stream, self.group, self.consumer, min_idle_time=CLAIM_IDLE_MS, count=100
        )
        messages = _messages(claimed[1])
        if messages:
            return messages
        return self._read(">", block_ms=max(1, int(timeout * 1000)))

    def _read(self, start: str, block_ms: int | None) -> list[Message]:
        reply = self.client.xreadgroup(
            self.group, self.consumer, {self.stream: start}, count=100, block=block_ms
        )
        found: list[Message] = []
        for _stream, entries in reply or []:
            found.extend(_messages(entries))
        return found

    def ack(self, messages: list[Message]) -> None:
        if not messages:
            return
        try:
            self.client.xack(self.stream, self.group, *[m.id for m in messages])
        except RedisError as exc:
            raise QueueUnavailableError(f"redis: {exc}") from exc

    def heartbeat(self) -> None:
        key = f"{self.stream}:worker:{self.consumer}"
        try:
            self.client.set(key, str(time.time()), ex=HEARTBEAT_TTL_SECONDS)
        except RedisError as exc:
            raise QueueUnavailableError(f"redis: {exc}") from exc

    def wake(self) -> None:
        return None  # a blocked read ends within the poll interval

    def ping(self) -> bool:
        try:
            return bool(self.client.ping())
        except RedisError:
            return False

    def close(self) -> None:
        self.client.close()


def _messages(entries: list) -> list[Message]:
    found = []
    for entry_id, fields in entries:
        ident = entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)
        raw = (fields or {}).get(b"job_id") or (fields or {}).get("job_id")
        found.append(Message(ident, int(raw) if raw else -1))  # -1: trimmed, only to ack
    return found
