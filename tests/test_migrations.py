"""The migrations build exactly the schema the ORM maps (what `alembic check` checks), on
both databases the ledger runs on, and they downgrade to nothing and back."""

from __future__ import annotations

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect

from service.ledger.db import alembic_config, make_engine, migrate
from service.ledger.schema import Base

from .service_support import postgres_database


def _differences(url: str) -> list:
    engine = make_engine(url)
    try:
        with engine.connect() as connection:
            return compare_metadata(MigrationContext.configure(connection), Base.metadata)
    finally:
        engine.dispose()


@pytest.mark.parametrize("database", ["sqlite", "postgresql"])
def test_the_migrated_schema_is_the_orm_s_and_downgrades_cleanly(database, tmp_path):
    if database == "sqlite":
        _check(f"sqlite:///{tmp_path / 'ledger.db'}")
    else:
        with postgres_database() as url:
            _check(url)


def _check(url: str) -> None:
    migrate(url)
    assert _differences(url) == []
    command.downgrade(alembic_config(url), "base")
    engine = make_engine(url)
    assert set(inspect(engine).get_table_names()) <= {"alembic_version"}
    engine.dispose()
    migrate(url)
    assert _differences(url) == []
