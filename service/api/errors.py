"""Errors as JSON `{error, type, field}`: 4xx naming the bad field, never a traceback."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DBAPIError, OperationalError
from starlette.exceptions import HTTPException as StarletteHTTPException

from editors.errors import EditError

log = logging.getLogger(__name__)


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        kind: str,
        field: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.field = status, message, kind, field
        self.headers = headers or {}


def bad_input(message: str, field: str | None, kind: str = "invalid_request") -> ApiError:
    return ApiError(422, message, kind, field)


def conflict(message: str, field: str | None = None) -> ApiError:
    return ApiError(409, message, "conflict", field)


def not_found(message: str, field: str | None = None) -> ApiError:
    return ApiError(404, message, "not_found", field)


def from_edit_error(exc: EditError, prefix: str = "") -> ApiError:
    kind = type(exc).__name__.removesuffix("Error")
    field = f"{prefix}{exc.field}" if exc.field else (prefix.rstrip(".") or None)
    return ApiError(422, str(exc), _snake(kind), field)


def _snake(name: str) -> str:
    return "".join(f"_{c.lower()}" if c.isupper() else c for c in name).lstrip("_")


def _body(message: str, kind: str, field: str | None) -> dict[str, str | None]:
    return {"error": message, "type": kind, "field": field}


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(_: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(
            _body(exc.message, exc.kind, exc.field), status_code=exc.status, headers=exc.headers
        )

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        loc = [str(part) for part in first.get("loc", ()) if part != "body"]
        field = ".".join(loc) or None
        message = f"{field}: {first.get('msg')}" if field else str(first.get("msg"))
        return JSONResponse(_body(message, "validation_error", field), status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return JSONResponse(_body(str(exc.detail), kind, None), status_code=exc.status_code)

    @app.exception_handler(OperationalError)
    @app.exception_handler(DBAPIError)
    async def database_down(_: Request, exc: Exception) -> JSONResponse:
        log.warning("ledger database unavailable: %s", type(exc).__name__)
        return JSONResponse(
            _body("the ledger database is unavailable; retry later", "unavailable", None),
            status_code=503,
            headers={"Retry-After": "5"},
        )

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        ident = str(request.scope.get("request_id") or "")
        log.exception("unhandled error (request %s)", ident or "unknown")
        return JSONResponse(
            _body("internal error (see the server log)", "internal", None),
            status_code=500,
            headers={"X-Request-ID": ident} if ident else None,
        )
