"""Database connection and Alembic migrations for the ledger."""

from __future__ import annotations

import contextlib
import fcntl
from collections.abc import Iterator
from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.orm import Session, sessionmaker

MIGRATIONS = Path(__file__).resolve().parents[2] / "migrations"
MIGRATION_LOCK = 0x45444954  # any fixed number: the advisory lock the migrating process holds


def make_engine(url: str, connect_timeout: float = 5.0, statement_timeout: float = 30.0) -> Engine:
    """An engine whose calls cannot hang: a database that stops answering fails a request
    after `connect_timeout` (connecting) or `statement_timeout` (a statement or a lock
    wait; PostgreSQL) seconds instead of freezing the routes that wait on it."""
    if url.startswith("sqlite"):
        path = url.split("///", 1)[-1]
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    if url.startswith("postgresql://"):
        url = "postgresql+psycopg://" + url.removeprefix("postgresql://")
    options = f"-c statement_timeout={int(statement_timeout * 1000)}"
    return create_engine(
        url,
        pool_pre_ping=True,
        pool_timeout=connect_timeout,
        connect_args={"connect_timeout": max(1, round(connect_timeout)), "options": options},
    )


def _sqlite_pragmas(dbapi_connection, _record) -> None:  # type: ignore[no-untyped-def]
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")  # readers do not block the worker's writes
    cursor.execute("PRAGMA synchronous=FULL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def session_factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


def alembic_config(url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


def migrate(url: str, revision: str = "head") -> None:
    """Bring the ledger schema to `revision` (idempotent). Processes starting together
    take turns: on PostgreSQL under an advisory lock, on SQLite under the file's lock."""
    engine = make_engine(url)  # on SQLite this creates the folder of the database file
    try:
        with engine.connect() as connection:
            if engine.dialect.name == "postgresql":
                connection.execute(text("SELECT pg_advisory_lock(:key)"), {"key": MIGRATION_LOCK})
                try:
                    command.upgrade(alembic_config(url), revision)
                finally:
                    connection.execute(
                        text("SELECT pg_advisory_unlock(:key)"), {"key": MIGRATION_LOCK}
                    )
            else:
                with _file_lock(url):
                    command.upgrade(alembic_config(url), revision)
    finally:
        engine.dispose()


@contextlib.contextmanager
def _file_lock(url: str) -> Iterator[None]:
    path = url.split("///", 1)[-1]
    if not path or path == ":memory:":
        yield
        return
    with open(f"{path}.migrate-lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
