"""/healthz (the process answers) and /readyz (model loaded, ledger head restored; this
process's role, the ledger head and how many versions behind it the served weights are)."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from sqlalchemy import text

from ..deps import StateDep

router = APIRouter(tags=["health"])


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """Answered on the event loop with no I/O: it stays up when the thread pool is busy
    waiting on a database that stopped answering."""
    return {"status": "ok"}


@router.get("/readyz")
def readyz(state: StateDep) -> JSONResponse:
    engine = state.engine
    head = None
    try:
        with state.db.connect() as connection:
            connection.execute(text("SELECT 1"))
        database = "ok"
        head = state.ledger.leases.head()
    except Exception as exc:
        database = f"unavailable: {type(exc).__name__}"
    body = {
        "ready": state.ready and database == "ok",
        "stage": state.boot_error or (engine.state.stage if engine else "loading the model"),
        "version": engine.version if engine and state.ready else None,
        "checksum": engine.checksum if engine and state.ready else None,
        "database": database,
        "queue": "ok" if state.queue.ping() else "unavailable",
        "role": str(state.role),
        "writer": state.lease.holder if state.lease is not None else None,
        "head": head,
        "lag": head - engine.version if head is not None and engine and state.ready else None,
        "follow_error": engine.follow_error if engine else None,
        "version_since": engine.replayer.served_since if engine and state.ready else None,
        "startup_seconds": engine.state.seconds if engine else {},
    }
    return JSONResponse(body, status_code=200 if body["ready"] else 503)
