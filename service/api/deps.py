"""Request dependencies: the service state and, for model routes, the ready engine."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

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
