"""New-version notices on Redis pub/sub: the writer announces each committed version, every
follower hears it at once. Notices are only wake-ups (a follower that misses one catches up
at its next poll of the ledger), so publishing never fails a job."""

from __future__ import annotations

import contextlib
import logging

import redis
from redis.client import PubSub
from redis.exceptions import RedisError

log = logging.getLogger(__name__)


class VersionNotices:
    def __init__(self, url: str, channel: str) -> None:
        self.client = redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=2)
        self.channel = channel
        self._subscription: PubSub | None = None

    def publish(self, number: int) -> None:
        try:
            self.client.publish(self.channel, str(number))
        except RedisError as exc:
            log.warning("could not announce version %s: %s", number, exc)

    def wait(self, timeout: float) -> int | None:
        """The newest version announced within `timeout` seconds, or None (nothing heard,
        or Redis unreachable: the caller polls the ledger either way)."""
        try:
            if self._subscription is None:
                self._subscription = self.client.pubsub(ignore_subscribe_messages=True)
                self._subscription.subscribe(self.channel)
            newest = None
            message = self._subscription.get_message(timeout=timeout)
            while message is not None:
                if message.get("type") == "message":
                    newest = max(newest or 0, int(message["data"]))
                message = self._subscription.get_message(timeout=0)
            return newest
        except (RedisError, ValueError, OSError) as exc:
            log.debug("version notices unavailable: %s", exc)
            self._drop()
            return None

    def _drop(self) -> None:
        if self._subscription is not None:
            with contextlib.suppress(RedisError, OSError):
                self._subscription.close()
            self._subscription = None

    def close(self) -> None:
        self._drop()
        self.client.close()
