"""/healthz (the process answers) and /readyz (model loaded, ledger head restored)."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from sqlalchemy import text

from ..deps import StateDep

router = APIRouter(tags=["health"])


@router.get("/healthz")
def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz")
def readyz(state: StateDep) -> JSONResponse:
    engine = state.engine
    try:
        with state.db.connect() as connection:
            connection.execute(text("SELECT 1"))
        database = "ok"
    except Exception as exc:
        database = f"unavailable: {type(exc).__name__}"
    body = {
        "ready": state.ready and database == "ok",
        "stage": state.boot_error or (engine.state.stage if engine else "loading the model"),
        "version": engine.version if engine and state.ready else None,
        "checksum": engine.checksum if engine and state.ready else None,
        "database": database,
        "queue": "ok" if state.queue.ping() else "unavailable",
        "worker": "in-process" if state.worker else "external",
        "startup_seconds": engine.state.seconds if engine else {},
    }
    return JSONResponse(body, status_code=200 if body["ready"] else 503)
