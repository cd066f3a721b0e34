"""The web console: one static page (no external assets, no build step) and its session.

Signing in trades an API key for an HttpOnly, SameSite=Strict cookie; the page then calls the
same /v1 API as every client, with the cookie instead of a Bearer header and, on requests
that change anything, the session's CSRF token in a header.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from fastapi import APIRouter, FastAPI, Request, Response
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field

from ..api.deps import StateDep, check_same_origin
from ..api.errors import ApiError
from ..auth import OPEN_ACCESS
from ..sessions import COOKIE_NAME, CSRF_HEADER, SignedIn
from ..state import ServiceState

STATIC = Path(__file__).parent / "static"
PAGE_HEADERS = {
    # the page and its assets come only from this origin; nothing may frame it
    "Content-Security-Policy": (
        "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}

router = APIRouter(prefix="/console", tags=["console"])


class SignInIn(BaseModel):
    api_key: str = Field(min_length=1, max_length=512)


class SessionOut(BaseModel):
    auth: Literal["keys", "open"]
    key_name: str
    scopes: list[str]
    csrf_token: str | None = Field(None, description=f"send it as {CSRF_HEADER} on changes")


@router.get("", include_in_schema=False)
def console_page() -> FileResponse:
    return FileResponse(STATIC / "index.html", headers=PAGE_HEADERS)


@router.post("/session", response_model=SessionOut)
def sign_in(body: SignInIn, request: Request, response: Response, state: StateDep) -> SessionOut:
    """Sign in with an API key; the answer sets the session cookie."""
    check_same_origin(request)
    if state.settings.auth == "open":
        return _open_session()
    client = request.client.host if request.client else "unknown"
    state.limiter.check(f"console-sign-in:{client}")  # guessing keys costs the rate limit
    signed = state.console_sessions.sign_in(body.api_key.strip())
    if signed is None:
        raise ApiError(401, "invalid or revoked API key", "unauthorized", "api_key")
    token, session = signed
    response.set_cookie(
        COOKIE_NAME,
        token,
        max_age=int(state.settings.console_session_hours * 3600),
        path="/",
        secure=request.url.scheme == "https",
        httponly=True,
        samesite="strict",
    )
    return _session_out(session)


@router.get("/session", response_model=SessionOut)
def current_session(request: Request, state: StateDep) -> SessionOut:
    if state.settings.auth == "open":
        return _open_session()
    return _session_out(_signed_in(request, state))


@router.delete("/session", status_code=204)
def sign_out(request: Request, state: StateDep) -> Response:
    """End the session (needs its CSRF header, like every change)."""
    response = Response(status_code=204)
    if state.settings.auth == "open":
        return response
    session = _signed_in(request, state)
    check_same_origin(request)
    if request.headers.get(CSRF_HEADER) != session.csrf_token:
        raise ApiError(403, f"missing or wrong {CSRF_HEADER} header", "csrf")
    state.console_sessions.sign_out(request.cookies[COOKIE_NAME])
    response.delete_cookie(COOKIE_NAME, path="/", httponly=True, samesite="strict")
    return response


def _signed_in(request: Request, state: ServiceState) -> SignedIn:
    token = request.cookies.get(COOKIE_NAME)
    session = state.console_sessions.lookup(token) if token else None
    if session is None:
        raise ApiError(401, "not signed in", "unauthorized")
    return session


def _session_out(session: SignedIn) -> SessionOut:
    principal = session.principal
    return SessionOut(
        auth="keys",
        key_name=principal.name,
        scopes=sorted(principal.scopes),
        csrf_token=session.csrf_token,
    )


def _open_session() -> SessionOut:
    return SessionOut(auth="open", key_name=OPEN_ACCESS.name, scopes=sorted(OPEN_ACCESS.scopes))


def install_console(app: FastAPI) -> None:
    app.include_router(router)
    app.mount("/console/assets", StaticFiles(directory=STATIC), name="console-assets")
