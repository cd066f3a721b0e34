"""The FastAPI application and its lifespan: ledger, queue, engine and worker, built once."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy.exc import SQLAlchemyError

from ..auth import ADMIN_KEY_FILE, write_private
from ..config import Settings
from ..console.routes import install_console
from ..observability import new_request_id, request_id
from ..state import ServiceState
from .docs import install_docs
from .errors import install_error_handlers
from .limits import BodySizeLimit
from .openai_errors import install_error_shape
from .routes import edits, evaluate, evaluations, generate, health, jobs, methods, model, openai

log = logging.getLogger(__name__)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        settings.warn_about_old_data_dir()
        state = ServiceState.create(settings, run_migrations=settings.auto_migrate)
        app.state.service = state
        if settings.auth == "keys":
            first_start_key(state)
        state.metrics.watch(
            queue_depth=state.ledger.pending_job_count,
            model_version=lambda: state.engine.version if state.engine else -1,
        )
        if settings.auth == "open":
            log.warning("OPEN MODE: no API keys are checked (EDITSERVE_AUTH=open); local use only")
        state.boot_in_background(run_worker=settings.run_worker)
        try:
            yield
        finally:
            state.close()

    app = FastAPI(
        title="EditServe",
        version="0.1.0",
        description="Knowledge editing for a served causal LM, with an exact ledger.",
        lifespan=lifespan,
        docs_url=None,  # install_docs serves them without a CDN
        redoc_url=None,
    )
    install_docs(app)
    install_error_handlers(app)
    install_error_shape(app)  # OpenAI's error shape on its routes only
    routes = (health, edits, jobs, model, methods, generate, evaluate, evaluations, openai)
    for module in routes:
        app.include_router(module.router)
    install_console(app)

    @app.get("/metrics", include_in_schema=False)
    def metrics(request: Request) -> Response:
        registry = request.app.state.service.metrics.registry
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    @app.middleware("http")
    async def observe(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        ident = new_request_id(request.headers.get("x-request-id"))
        request.scope["request_id"] = ident  # for the 500 handler, which runs outside this
        token = request_id.set(ident)
        started = time.perf_counter()
        try:
            response = await call_next(request)
        finally:
            request_id.reset(token)
        route = getattr(request.scope.get("route"), "path", "unmatched")
        service = getattr(request.app.state, "service", None)
        if service is not None:
            service.metrics.requests.labels(request.method, route, response.status_code).inc()
            service.metrics.latency.labels(request.method, route).observe(
                time.perf_counter() - started
            )
        response.headers["X-Request-ID"] = ident
        return response

    app.add_middleware(BodySizeLimit, limit=settings.max_body_bytes)
    return app


def first_start_key(state: ServiceState) -> None:
    """Keys mode with no key in the ledger: create an admin key, write it to the data dir
    (mode 0600) and say it once on stderr, so a first start needs no other command."""
    try:
        plain = state.keys.create_first_admin()
    except SQLAlchemyError as exc:  # the database away: start anyway, as without this step
        log.warning("could not check for a first admin key: %s", type(exc).__name__)
        return
    if plain is None:
        return
    path = state.settings.data_dir.absolute() / ADMIN_KEY_FILE
    try:
        write_private(path, plain + "\n")
        where = f"also in {path}"
    except OSError as exc:
        where = f"could not write {path}: {exc}; it is not shown again"
    print(f"First start: created admin API key {plain} ({where})", file=sys.stderr, flush=True)
