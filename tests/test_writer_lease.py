"""The single-writer guarantees, enforced by the database (SQLite and real PostgreSQL): the
head compare-and-set, the fencing token on every write, the lease's take-over rules, and
blobs kept in the ledger database."""

from __future__ import annotations

import threading

import pytest

from service.engine.lease import Role, WriterLease
from service.ledger.blobs import BlobError, DatabaseBlobStore
from service.ledger.db import make_engine, migrate, session_factory
from service.ledger.lease import StaleWriterError
from service.ledger.schema import Status, VersionKind
from service.ledger.store import Ledger, NewEdit, NewVersion

from .service_support import postgres_database


@pytest.fixture(params=["sqlite", "postgresql"])
def ledger(request, tmp_path):
    def make(url: str) -> Ledger:
        migrate(url)
        ledger = Ledger(session_factory(make_engine(url)), model="tiny")
        ledger.ensure_base("c0")
        return ledger

    if request.param == "sqlite":
        yield make(f"sqlite:///{tmp_path / 'ledger.db'}")
    else:
        with postgres_database() as url:
            yield make(url)


def _accept(ledger: Ledger, target: str) -> tuple[int, str]:
    request = {"prompt": "The capital of {} is", "subject": "France", "target_new": target}
    job, (edit_id,) = ledger.accept_edits([NewEdit(request, "rome", {})])
    return job.id, edit_id


def _version_on(head: int, edit_id: str) -> NewVersion:
    return NewVersion(VersionKind.edit, parent=head, checksum=f"c{head + 1}", edit_ids=(edit_id,))


def _take(ledger: Ledger, me: str) -> int:
    view = ledger.leases.view()
    assert view is not None
    token = ledger.leases.acquire(me, view)
    assert token is not None
    return token


def test_two_versions_computed_on_one_head_cannot_both_be_recorded(ledger):
    first_job, first = _accept(ledger, "Rome")
    second_job, second = _accept(ledger, "Berlin")
    ledger.add_version(_version_on(0, first), first_job, True, [first])
    with pytest.raises(StaleWriterError, match="no longer 0"):
        ledger.add_version(_version_on(0, second), second_job, True, [second])
    assert ledger.head().number == 1
    assert ledger.edit(second).status == Status.queued  # nothing of it was written
    assert ledger.job(second_job).result_version is None


def test_a_writer_that_lost_its_lease_commits_nothing(ledger):
    job_id, edit_id = _accept(ledger, "Rome")
    old = _take(ledger, "old-writer")
    assert ledger.start_job(job_id, old, "old-writer") is not None
    view = ledger.leases.view()
    new = ledger.leases.acquire("new-writer", view)  # the old one looked dead
    assert new == old + 1
    with pytest.raises(StaleWriterError):
        ledger.add_version(_version_on(0, edit_id), job_id, True, [edit_id], fence=old)
    with pytest.raises(StaleWriterError):
        ledger.finish_job(job_id, Status.failed, "boom", "RuntimeError", fence=old)
    with pytest.raises(StaleWriterError):
        ledger.start_job(job_id, old, "old-writer")
    assert not ledger.leases.renew(old)
    assert ledger.job(job_id).status == Status.running and ledger.head().number == 0
    version = ledger.add_version(_version_on(0, edit_id), job_id, True, [edit_id], fence=new)
    assert version.number == 1 and ledger.job(job_id).status == Status.applied


def test_a_rebase_records_all_its_versions_or_none(ledger):
    job_id, edit_id = _accept(ledger, "Rome")
    token = _take(ledger, "writer")
    versions = [
        NewVersion(VersionKind.revert, parent=0, checksum="c0", on_head=0),
        NewVersion(VersionKind.rebase, parent=1, checksum="c2", edit_ids=(edit_id,)),
        NewVersion(VersionKind.rebase, parent=2, checksum="c3", edit_ids=(edit_id,)),
    ]
    stale = [*versions[:2], NewVersion(VersionKind.rebase, parent=7, checksum="c9")]
    with pytest.raises(StaleWriterError):  # the third is not on the second: none recorded
        ledger.add_versions(stale, job_id, token)
    assert ledger.head().number == 0 and ledger.leases.head() == 0
    recorded = ledger.add_versions(versions, job_id, token)
    assert [v.number for v in recorded] == [1, 2, 3]
    assert ledger.job(job_id).status == Status.applied and ledger.job(job_id).result_version == 3


def test_a_standby_takes_over_only_when_the_writer_stops_beating(ledger):
    writer = WriterLease(ledger.leases, "writer", lease_seconds=0.3)
    standby = WriterLease(ledger.leases, "standby", lease_seconds=0.3)
    writer.tick()
    standby.tick()
    assert (writer.role, standby.role) == (Role.writer, Role.standby)
    for _ in range(8):  # the writer keeps renewing: the standby waits, however long
        threading.Event().wait(0.1)
        writer.tick()
        standby.tick()
    assert standby.role == Role.standby and standby.holder == "writer"
    # the writer stops (killed): after one lease period of silence the standby takes over
    deadline = threading.Event()
    for _ in range(20):
        standby.tick()
        if standby.role == Role.writer:
            break
        deadline.wait(0.05)
    assert standby.role == Role.writer and standby.token == (writer.token or 0) + 1
    writer.tick()  # the old writer's renewal fails: it learns it lost the lease
    assert writer.role == Role.standby
    standby.stop()  # a clean stop gives the lease up: the next process takes it at once
    fresh = WriterLease(ledger.leases, "fresh", lease_seconds=60)
    fresh.tick()
    assert fresh.role == Role.writer


def test_blobs_in_the_ledger_database_are_named_by_content_and_verified(ledger):
    store = DatabaseBlobStore(ledger.sessions)
    sha = store.put(b"patch bytes")
    assert store.put(b"patch bytes") == sha and store.exists(sha)
    assert store.get(sha) == b"patch bytes"
    with pytest.raises(BlobError, match="missing"):
        store.get("0" * 64)
