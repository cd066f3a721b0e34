"""The ledger on SQLite and on the machine's real PostgreSQL: order, statuses, versions,
chains, append-only history, and the migrations matching the ORM."""

from __future__ import annotations

import subprocess
import sys

import pytest
from alembic import command
from sqlalchemy import inspect

from service.ledger.blobs import BlobError, FileBlobStore
from service.ledger.db import alembic_config, make_engine, migrate, session_factory
from service.ledger.schema import JobKind, Status, VersionKind
from service.ledger.store import Ledger, LedgerMismatchError, NewEdit, NewVersion, live_edits

from .service_support import ROOT, postgres_database


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request, tmp_path):
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'ledger.db'}"
    else:
        with postgres_database() as url:
            yield url


@pytest.fixture
def ledger(database_url):
    migrate(database_url)
    engine = make_engine(database_url)
    yield Ledger(session_factory(engine), model="tiny")
    engine.dispose()


def _edit(target: str) -> NewEdit:
    request = {"prompt": "The capital of {} is", "subject": "France", "target_new": target}
    return NewEdit(request, "rome", {})


def test_migrations_match_the_models(database_url):
    migrate(database_url)
    command.check(alembic_config(database_url))  # raises if autogenerate finds a difference
    engine = make_engine(database_url)
    assert {"jobs", "edits", "versions", "alembic_version"} <= set(
        inspect(engine).get_table_names()
    )
    engine.dispose()


def test_migrate_command_is_idempotent(tmp_path):
    url = f"sqlite:///{tmp_path / 'cli.db'}"
    for _ in range(2):
        done = subprocess.run(
            [sys.executable, "-m", "service.cli", "migrate", "--database-url", url],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=False,
        )
        assert done.returncode == 0, done.stderr
    command.check(alembic_config(url))


def test_jobs_come_out_in_acceptance_order_until_they_end(ledger):
    ledger.ensure_base("c0")
    first, (edit_a,) = ledger.accept_edits([_edit("Rome")])
    second = ledger.accept_job(JobKind.rollback, {"to_version": 0})
    third, _ = ledger.accept_edits([_edit("Berlin"), _edit("Madrid")])
    assert ledger.pending_job_ids() == [first.id, second.id, third.id]
    assert ledger.next_pending_job().id == first.id
    ledger.start_job(first.id)  # an interrupted running job stays first in line
    assert ledger.next_pending_job().id == first.id
    assert ledger.edit(edit_a).status == Status.running
    version = ledger.add_version(
        NewVersion(VersionKind.edit, parent=0, checksum="c1", patch_sha256="a" * 64,
                   edit_ids=(edit_a,)),
        first.id, finish_job=True, applied_edits=[edit_a],
    )  # fmt: skip
    assert version.number == 1
    assert ledger.job(first.id).status == Status.applied
    assert ledger.edit(edit_a).status == Status.applied and ledger.edit(edit_a).version == 1
    assert ledger.job_has_version(first.id)
    ledger.finish_job(second.id, Status.rejected, "nope", "Rejected")
    assert ledger.next_pending_job().id == third.id
    ledger.finish_job(third.id, Status.failed, "boom", "RuntimeError")
    assert all(e.status == Status.failed and e.error == "boom" for e in ledger.edits_of_job(3))
    assert ledger.next_pending_job() is None


def test_base_of_other_weights_is_refused(ledger):
    ledger.ensure_base("checksum-of-model-a")
    ledger.ensure_base("checksum-of-model-a")  # same weights: fine
    with pytest.raises(LedgerMismatchError):
        ledger.ensure_base("checksum-of-model-b")


def test_chains_and_live_edits_follow_rollbacks_and_reverts(ledger):
    ledger.ensure_base("c0")
    ids = []
    for n, target in enumerate(["Rome", "Berlin", "Madrid"], start=1):
        job, (edit_id,) = ledger.accept_edits([_edit(target)])
        ids.append(edit_id)
        ledger.add_version(
            NewVersion(VersionKind.edit, parent=n - 1, checksum=f"c{n}",
                       patch_sha256=f"{n}" * 64, edit_ids=(edit_id,)),
            job.id, finish_job=True, applied_edits=[edit_id],
        )  # fmt: skip
    head = ledger.head()
    assert head.number == 3
    assert [v.number for v in ledger.chain(3)] == [0, 1, 2, 3]
    assert live_edits(ledger.chain(3)) == {ids[0]: 1, ids[1]: 2, ids[2]: 3}
    job = ledger.accept_job(JobKind.rollback, {"to_version": 1})
    ledger.add_version(
        NewVersion(VersionKind.rollback, parent=1, checksum="c1", on_head=3), job.id, True
    )
    assert [v.number for v in ledger.chain(4)] == [0, 1, 4]
    assert live_edits(ledger.chain(4)) == {ids[0]: 1}
    job = ledger.accept_job(JobKind.revert, {"edit_id": ids[0], "mode": "subtract"})
    ledger.add_version(
        NewVersion(VersionKind.revert, parent=4, checksum="c0", patch_sha256="f" * 64, reverts=1),
        job.id, True,
    )  # fmt: skip
    assert live_edits(ledger.chain(5)) == {}
    # nothing was deleted: every version and edit is still there
    assert [v.number for v in ledger.versions()] == [5, 4, 3, 2, 1, 0]
    assert ledger.list_edits()[1] == 3


def test_blob_store_names_by_content_and_verifies_on_read(tmp_path):
    store = FileBlobStore(tmp_path / "blobs")
    sha = store.put(b"patch bytes")
    assert store.put(b"patch bytes") == sha and store.exists(sha)
    assert store.get(sha) == b"patch bytes"
    path = next((tmp_path / "blobs").rglob("*.safetensors"))
    path.write_bytes(b"tampered")
    with pytest.raises(BlobError, match="corrupt"):
        store.get(sha)
    with pytest.raises(BlobError, match="missing"):
        store.get("0" * 64)
