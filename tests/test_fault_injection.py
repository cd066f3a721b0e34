"""Fault injection, scripted and repeatable: the worker SIGKILLed at seeded random moments
across 24 edits (real PostgreSQL and Redis), PostgreSQL stopped mid-edit, the blob store's
disk full."""

from __future__ import annotations

import contextlib
import random
import signal
import subprocess
import time

from .service_support import (
    PostgresServer,
    postgres_database,
    require_shared_redis,
    running_app,
    start_worker,
    wait_job,
)

QUICK = {"steps": 5}  # small edits: the test is about the ledger, not the edit quality
EDITS = 24


def _facts() -> list[tuple[str, str, str]]:
    subjects = [f"Person {chr(65 + i % 26)}{i}" for i in range(EDITS)]
    targets = ["English", "French", "Paris", "Rome", "piano", "Tokyo", "guitar", "Peru"]
    return [
        ("The favourite word of {} is", s, targets[i % len(targets)])
        for i, s in enumerate(subjects)
    ]


def _accept_all(client) -> list[int]:
    jobs = []
    for prompt, subject, target in _facts():
        body = {"edit": {"prompt": prompt, "subject": subject, "target_new": target},
                "hparams": QUICK}  # fmt: skip
        reply = client.post("/v1/edits", json=body)
        assert reply.status_code == 202, reply.json()
        jobs.append(reply.json()["job_id"])
    return jobs


def test_worker_killed_at_random_points_applies_every_edit_once_in_order(tiny_settings, tmp_path):
    with running_app(tiny_settings()) as clean:  # the reference: a run nobody interrupts
        for job_id in _accept_all(clean):
            assert wait_job(clean, job_id)["status"] == "applied"
        expected = clean.get("/v1/model").json()["checksum"]

    chance = random.Random(20261122)
    kills = 0
    with postgres_database() as database_url:
        settings = tiny_settings(
            database_url=database_url,
            redis_url=require_shared_redis(),
            run_worker=False,
            # the kills come from outside: a job they hit again and again is not a job that
            # crashes the worker, so the crash-loop guard must not give up on it here
            max_job_attempts=1000,
        )
        with running_app(settings) as client:
            jobs = _accept_all(client)
            while True:
                log = tmp_path / f"worker-{kills}.log"
                worker = start_worker(settings, log)
                deadline = time.monotonic() + 120
                while b"ready at version" not in log.read_bytes():
                    assert worker.poll() is None and time.monotonic() < deadline, log.read_text()
                    time.sleep(0.05)
                # kill after a seeded number of further versions and a seeded moment into
                # the next job (progress-based, so a fast machine is interrupted as often)
                wanted = _head(client) + chance.randint(1, 6)
                while _head(client) < min(wanted, EDITS):
                    if worker.poll() is not None or time.monotonic() > deadline:
                        break
                    time.sleep(0.01)
                time.sleep(chance.uniform(0.0, 0.05))
                if (
                    kills < 6
                    and worker.poll() is None
                    and client.get(f"/v1/jobs/{jobs[-1]}").json()["status"] in ("queued", "running")
                ):
                    worker.send_signal(signal.SIGKILL)
                    worker.wait()
                    kills += 1
                    continue
                break
            try:
                finished = [wait_job(client, job_id) for job_id in jobs]
            finally:
                worker.send_signal(signal.SIGTERM)
                worker.wait(60)
            assert kills >= 3, "the script should interrupt the worker several times"
            assert [job["status"] for job in finished] == ["applied"] * EDITS, finished
            assert [job["result_version"] for job in finished] == list(range(1, EDITS + 1))
            versions = client.get("/v1/versions", params={"limit": 1000}).json()
            assert sorted(v["job_id"] for v in versions if v["job_id"]) == jobs  # once each
            assert client.get("/v1/model").json()["checksum"] == expected


def test_postgres_restarted_mid_run_answers_503_then_resumes_by_itself(tiny_settings, tmp_path):
    database = PostgresServer()
    database.init()
    database.start()
    try:
        settings = tiny_settings(database_url=database.url, redis_url=require_shared_redis())
        with running_app(settings) as client:
            first = client.post("/v1/edits", json=_body(0, {"steps": 400, "stop_nll": 1e-9}))
            job_id = first.json()["job_id"]
            _until(lambda: client.get(f"/v1/jobs/{job_id}").json()["status"] == "running")
            database.stop()  # the database dies while the edit is being computed
            down = client.get("/v1/edits")
            assert down.status_code == 503 and down.json()["type"] == "unavailable"
            assert client.post("/v1/edits", json=_body(1)).status_code == 503  # not accepted
            assert client.get("/readyz").status_code == 503
            time.sleep(1.0)
            database.start()  # and comes back: the service resumes without a restart
            job = wait_job(client, job_id)
            assert job["status"] == "applied", job
            assert len([v for v in client.get("/v1/versions").json() if v["job_id"] == job_id]) == 1
            second = client.post("/v1/edits", json=_body(2))
            assert second.status_code == 202
            assert wait_job(client, second.json()["job_id"])["status"] == "applied"
            assert client.get("/readyz").status_code == 200
            model = client.get("/v1/model").json()
            assert model["version"] == 2
            assert model["checksum"] == client.get("/v1/versions").json()[0]["checksum"]
    finally:
        database.remove()


def _head(client) -> int:
    """The newest version in the ledger (whoever wrote it)."""
    return client.get("/v1/versions", params={"limit": 1}).json()[0]["number"]


def _body(index: int, hparams: dict | None = None) -> dict:
    prompt, subject, target = _facts()[index]
    edit = {"prompt": prompt, "subject": subject, "target_new": target}
    return {"edit": edit, "hparams": hparams or QUICK}


def _until(condition, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_disk_full_on_the_blob_store_fails_the_edit_and_applies_nothing(tiny_settings, tmp_path):
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(blobs)], check=True)
    try:
        with running_app(tiny_settings(blob_store="filesystem", blob_dir=blobs)) as client:
            before = client.get("/v1/model").json()
            filler = blobs / "filler"
            with contextlib.suppress(OSError), filler.open("wb", buffering=0) as handle:
                while True:  # fill the store's disk to the last byte
                    handle.write(b"\0" * 4096)
            job = wait_job(client, client.post("/v1/edits", json=_body(0)).json()["job_id"])
            assert job["status"] == "failed" and "No space left" in job["error"], job
            after = client.get("/v1/model").json()
            assert (after["version"], after["checksum"]) == (before["version"], before["checksum"])
            filler.unlink()  # space again: the next edit goes through
            job = wait_job(client, client.post("/v1/edits", json=_body(1)).json()["job_id"])
            assert job["status"] == "applied" and job["result_version"] == 1
    finally:
        subprocess.run(["umount", str(blobs)], check=True)
