"""Request limits: body size (an ASGI middleware), per-key rate, queue depth."""

from __future__ import annotations

import json
import threading
import time
from typing import TYPE_CHECKING

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..observability import new_request_id
from .errors import ApiError
from .openai_errors import is_openai_path, openai_error_body

if TYPE_CHECKING:
    from ..state import ServiceState


class BodySizeLimit:
    """Reads the whole body before any handler does (it is small: at most `limit` bytes) and
    refuses what no handler should see: 413 for a body over `limit` bytes, declared or
    streamed (chunked); for a JSON body, 422 for bytes that are not UTF-8, for JSON that does
    not parse (with its line and column), and for a string holding a lone surrogate (naming
    the field), which no tokenizer can encode. The body then goes to the app unchanged."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            await _refuse(
                scope, send, 413, f"request body is over {self.limit} bytes", "body_too_large"
            )
            return
        chunks: list[bytes] = []
        received = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                await self.app(scope, _replay([message]), send)  # the client went away
                return
            chunks.append(message.get("body", b""))
            received += len(chunks[-1])
            if received > self.limit:
                await _refuse(
                    scope, send, 413, f"request body is over {self.limit} bytes", "body_too_large"
                )
                return
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        if body and b"json" in headers.get(b"content-type", b""):
            problem = _json_problem(body)
            if problem is not None:
                await _refuse(scope, send, 422, *problem)
                return
        await self.app(scope, _replay([{"type": "http.request", "body": body}], receive), send)


def _replay(messages: list[Message], then: Receive | None = None) -> Receive:
    pending = list(messages)

    async def receive() -> Message:
        if pending:
            return pending.pop(0)
        if then is not None:
            return await then()  # after the body: a disconnect, when it comes
        return {"type": "http.disconnect"}

    return receive


def _json_problem(body: bytes) -> tuple[str, str, str | None] | None:
    """(message, type, field) of what is wrong with a JSON body, or None."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        return f"request body is not UTF-8 (byte {exc.start})", "invalid_unicode", None
    try:
        parsed = json.loads(text)
    except json.JSONDecodeError as exc:
        where = f"line {exc.lineno}, column {exc.colno}"
        return f"request body is not valid JSON at {where}: {exc.msg}", "invalid_json", None
    field = _lone_surrogate(parsed, "")
    if field is not None:
        message = f"{field or 'body'}: holds a lone surrogate, which is not valid Unicode"
        return message, "invalid_unicode", field or None
    return None


def _lone_surrogate(value: object, path: str) -> str | None:
    """The dotted path of the first string (or key) that cannot be encoded as UTF-8."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return path
        return None
    if isinstance(value, dict):
        items: list[tuple[object, object]] = list(value.items())
    elif isinstance(value, list):
        items = list(enumerate(value))
    else:
        return None
    for key, item in items:
        where = f"{path}.{key}" if path else str(key)
        if isinstance(key, str) and _lone_surrogate(key, where) is not None:
            return where
        found = _lone_surrogate(item, where)
        if found is not None:
            return found
    return None


async def _refuse(
    scope: Scope, send: Send, status: int, message: str, kind: str, field: str | None = None
) -> None:
    given = dict(scope.get("headers") or []).get(b"x-request-id", b"")
    ident = new_request_id(given.decode("latin-1"))  # refusals are traceable like the rest
    if is_openai_path(scope.get("path", "")):
        status = 400 if status == 422 else status
        shaped: dict[str, object] = openai_error_body(status, message, field, kind)
    else:
        shaped = {"error": message, "type": kind, "field": field}
    body = json.dumps(shaped).encode()
    headers = [(b"content-type", b"application/json"), (b"x-request-id", ident.encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class RateLimiter:
    """A token bucket per key: `per_minute` requests, refilled continuously."""

    def __init__(self, per_minute: int) -> None:
        self.per_minute = per_minute
        self._buckets: dict[str, tuple[float, float]] = {}
        self._lock = threading.Lock()

    def check(self, key: str) -> None:
        if self.per_minute <= 0:
            return
        now = time.monotonic()
        rate = self.per_minute / 60.0
        with self._lock:
            tokens, last = self._buckets.get(key, (float(self.per_minute), now))
            tokens = min(float(self.per_minute), tokens + (now - last) * rate)
            if tokens < 1.0:
                self._buckets[key] = (tokens, now)
                wait = max(1, round((1.0 - tokens) / rate))
                raise ApiError(
                    429,
                    f"rate limit of {self.per_minute} requests per minute reached",
                    "rate_limited",
                    headers={"Retry-After": str(wait)},
                )
            self._buckets[key] = (tokens - 1.0, now)


def check_queue_depth(state: ServiceState) -> None:
    depth = state.ledger.pending_job_count()
    if depth >= state.settings.max_queue_depth:
        raise ApiError(
            429,
            f"the edit queue holds {depth} unfinished jobs (limit "
            f"{state.settings.max_queue_depth}); retry later",
            "queue_full",
            headers={"Retry-After": "30"},
        )
