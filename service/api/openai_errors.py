"""OpenAI's error shape (`{"error": {message, type, param, code}}`) on the OpenAI-compatible
paths, the service's own (`{error, type, field}`) everywhere else."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable

from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .errors import ApiError
from .openai_schemas import ErrorInfo, ErrorOut

OPENAI_PATHS = ("/v1/completions", "/v1/chat/completions", "/v1/models")

_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    429: "rate_limit_error",
}


def is_openai_path(path: str) -> bool:
    return path in OPENAI_PATHS or path.startswith("/v1/models/")


def openai_error_body(
    status: int, message: str, param: str | None, code: str | None
) -> dict[str, object]:
    kind = _ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return ErrorOut(
        error=ErrorInfo(message=message, type=kind, param=param, code=code)
    ).model_dump()


def _openai_error(
    status: int, message: str, param: str | None, code: str | None, headers: dict[str, str]
) -> JSONResponse:
    body = openai_error_body(status, message, param, code)
    return JSONResponse(body, status_code=status, headers=headers)


Handler = Callable[[Request, Exception], Awaitable[Response]]


def _reshaping(service: Handler) -> Handler:
    """The service's own handler, its `{error, type, field}` answer re-shaped on the OpenAI
    paths (its status kept, but 422 becomes 400, as OpenAI and vLLM answer)."""

    async def handle(request: Request, exc: Exception) -> Response:
        response = await service(request, exc)
        if not is_openai_path(request.url.path):
            return response
        body = json.loads(bytes(response.body))
        status = 400 if response.status_code == 422 else response.status_code
        headers = {
            name: value
            for name, value in response.headers.items()
            if name.lower() not in ("content-length", "content-type")
        }
        return _openai_error(status, body["error"], body.get("field"), body.get("type"), headers)

    return handle


def _validation(service: Handler) -> Handler:
    """400 naming the top-level field (`param`), as vLLM answers a bad parameter."""

    async def handle(request: Request, exc: Exception) -> Response:
        if not is_openai_path(request.url.path) or not isinstance(exc, RequestValidationError):
            return await service(request, exc)
        errors = exc.errors()
        first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
        loc = [str(part) for part in first.get("loc", ()) if part != "body"]
        message = f"{'.'.join(loc)}: {first.get('msg')}" if loc else str(first.get("msg"))
        return _openai_error(400, message, loc[0] if loc else None, "validation_error", {})

    return handle


def install_error_shape(app: FastAPI) -> None:
    """OpenAI's error shape on the OpenAI paths, the service's everywhere else. Call it
    after the service's own handlers are installed: it wraps them."""
    for kind in (ApiError, StarletteHTTPException, Exception):
        app.add_exception_handler(kind, _reshaping(app.exception_handlers[kind]))
    service = app.exception_handlers[RequestValidationError]
    app.add_exception_handler(RequestValidationError, _validation(service))
