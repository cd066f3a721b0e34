"""The FastAPI application and its lifespan: ledger, queue, engine and worker, built once."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from ..config import Settings
from ..state import ServiceState
from .errors import install_error_handlers
from .routes import edits, generate, health, jobs, model


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state = ServiceState.create(settings, run_migrations=settings.auto_migrate)
        app.state.service = state
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
    )
    install_error_handlers(app)
    for module in (health, edits, jobs, model, generate):
        app.include_router(module.router)
    return app
