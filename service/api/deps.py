"""Request dependencies: the service state and, for model routes, the ready engine."""

from __future__ import annotations

import hmac
from collections.abc import Callable
from typing import Annotated
from urllib.parse import urlsplit

from fastapi import Depends, Request

from ..auth import OPEN_ACCESS, Principal
from ..engine.engine import Engine
from ..sessions import COOKIE_NAME, CSRF_HEADER
from ..state import ServiceState
from .errors import ApiError


def get_state(request: Request) -> ServiceState:
    return request.app.state.service  # type: ignore[no-any-return]


def get_engine(state: Annotated[ServiceState, Depends(get_state)]) -> Engine:
    if state.boot_error:
        raise ApiError(503, f"the service failed to start: {state.boot_error}", "unavailable")
    if not state.ready or state.engine is None:
        stage = state.engine.state.stage if state.engine else "loading the model"
        raise ApiError(503, f"the model is not ready yet ({stage})", "not_ready")
    return state.engine


StateDep = Annotated[ServiceState, Depends(get_state)]
EngineDep = Annotated[Engine, Depends(get_engine)]


SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def authenticated(request: Request, state: StateDep) -> Principal:
    """The caller's key: a Bearer token, or a web console session cookie (which, to change
    anything, also needs its CSRF header and a same-origin Origin). In open mode everyone
    may do everything."""
    if state.settings.auth == "open":
        return OPEN_ACCESS
    header = request.headers.get("authorization", "")
    cookie = request.cookies.get(COOKIE_NAME)
    if not header and cookie:
        principal = _console_principal(request, state, cookie)
    else:
        principal = _bearer_principal(header, state)
    state.limiter.check(principal.key_id)
    return principal


def _bearer_principal(header: str, state: ServiceState) -> Principal:
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise ApiError(
            401,
            "missing API key: send 'Authorization: Bearer <key>'",
            "unauthorized",
            headers={"WWW-Authenticate": "Bearer"},
        )
    principal = state.keys.authenticate(token.strip())
    if principal is None:
        raise ApiError(
            401,
            "invalid or revoked API key",
            "unauthorized",
            headers={"WWW-Authenticate": "Bearer"},
        )
    return principal


def _console_principal(request: Request, state: ServiceState, cookie: str) -> Principal:
    signed_in = state.console_sessions.lookup(cookie)
    if signed_in is None:
        raise ApiError(401, "the console session has ended: sign in again", "unauthorized")
    if request.method not in SAFE_METHODS:
        check_same_origin(request)
        presented = request.headers.get(CSRF_HEADER, "")
        if not hmac.compare_digest(presented, signed_in.csrf_token):
            raise ApiError(
                403, f"missing or wrong {CSRF_HEADER} header for a console session", "csrf"
            )
    return signed_in.principal


def check_same_origin(request: Request) -> None:
    """Refuse a request a page of another origin sent (browsers always send Origin on a
    cross-origin POST); SameSite=Strict already keeps the cookie off such requests."""
    origin = request.headers.get("origin")
    if origin is None:
        return
    host = request.headers.get("host", "")
    if urlsplit(origin).netloc != host:
        raise ApiError(403, f"cross-origin request from {origin} refused", "csrf")


def require(scope: str) -> Callable[..., Principal]:
    def check(principal: Annotated[Principal, Depends(authenticated)]) -> Principal:
        if not principal.allows(scope):
            raise ApiError(403, f"this key lacks the {scope!r} scope", "forbidden", headers={})
        return principal

    return check
