"""Request dependencies: the service state and, for model routes, the ready engine."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated

from fastapi import Depends, Request

from ..auth import OPEN_ACCESS, Principal
from ..engine.engine import Engine
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


def authenticated(request: Request, state: StateDep) -> Principal:
    """The caller's key (Bearer token); in open mode everyone may do everything."""
    if state.settings.auth == "open":
        return OPEN_ACCESS
    header = request.headers.get("authorization", "")
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
    state.limiter.check(principal.key_id)
    return principal


def require(scope: str) -> Callable[..., Principal]:
    def check(principal: Annotated[Principal, Depends(authenticated)]) -> Principal:
        if not principal.allows(scope):
            raise ApiError(403, f"this key lacks the {scope!r} scope", "forbidden", headers={})
        return principal

    return check
