"""Crashes and outages on the real PostgreSQL and Redis: a worker killed mid-edit, Redis
flushed, restarted or down. Nothing accepted is lost, nothing applies twice, order holds."""

from __future__ import annotations

import signal
import time

import redis

from .service_support import (
    RedisServer,
    post_edit,
    postgres_database,
    require_shared_redis,
    running_app,
    start_worker,
    wait_job,
)

SLOW = {"steps": 1000, "stop_nll": 1e-9}  # long enough to be killed in the middle
FACTS = [
    ("The mother tongue of {} is", "Danielle Darrieux", "English"),
    ("{} plays the position of", "Ricky Rubio", "goalkeeper"),
    ("The capital of {} is", "Atlantis", "Paris"),
    ("{} was born in", "Ada Lovelace", "Tokyo"),
    ("{} is a citizen of", "Alan Turing", "Peru"),
]


def _wait(predicate, timeout: float = 300.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def _versions_of(client, job_id: int) -> list[dict]:
    return [v for v in client.get("/v1/versions").json() if v["job_id"] == job_id]


def test_worker_killed_mid_edit_completes_it_exactly_once(tiny_settings, tmp_path):
    with postgres_database() as database_url:
        settings = tiny_settings(
            database_url=database_url, redis_url=require_shared_redis(), run_worker=False
        )
        with running_app(settings) as client:  # the API only; the worker runs apart
            accepted = post_edit(client, *FACTS[0], hparams=SLOW)
            job_id = accepted["job_id"]
            worker = start_worker(settings, tmp_path / "worker-1.log")
            try:
                _wait(
                    lambda: client.get(f"/v1/jobs/{job_id}").json()["stage"].startswith("optimise"),
                    what="the edit to be optimising",
                )
                worker.send_signal(signal.SIGKILL)
                worker.wait()
            finally:
                worker.kill()
            interrupted = client.get(f"/v1/jobs/{job_id}").json()
            assert interrupted["status"] == "running" and interrupted["attempts"] == 1
            assert _versions_of(client, job_id) == []
            assert client.get("/v1/model").json()["version"] == 0

            worker = start_worker(settings, tmp_path / "worker-2.log")
            try:
                job = wait_job(client, job_id)
                assert job["status"] == "applied" and job["attempts"] == 2, job
                assert len(_versions_of(client, job_id)) == 1  # exactly once
                edit = client.get(f"/v1/edits/{accepted['edit_ids'][0]}").json()
                assert edit["status"] == "applied" and edit["live"] and edit["version"] == 1
                # the API's own copy follows the worker's ledger to the same weights
                model = client.get("/v1/model").json()
                assert model["version"] == 1
                assert model["checksum"] == client.get("/v1/versions").json()[0]["checksum"]
            finally:
                worker.send_signal(signal.SIGTERM)
                worker.wait(60)


def test_redis_flushed_restarted_or_down_loses_nothing_and_keeps_order(tiny_settings, tmp_path):
    server = RedisServer(tmp_path / "redis")
    server.start()
    try:
        with postgres_database() as database_url:
            settings = tiny_settings(
                database_url=database_url, redis_url=server.url, run_worker=False
            )
            with running_app(settings) as client:
                queued = [post_edit(client, *fact)["job_id"] for fact in FACTS[:3]]
                redis.Redis.from_url(server.url).flushall()  # the queued messages are gone
                server.stop()
                server.start()  # and Redis restarts empty
                worker = start_worker(settings, tmp_path / "worker.log")
                try:
                    jobs = [wait_job(client, job_id) for job_id in queued]
                    assert [j["status"] for j in jobs] == ["applied"] * 3
                    assert [j["result_version"] for j in jobs] == [1, 2, 3]  # acceptance order
                    versions = sorted(client.get("/v1/versions").json(), key=lambda v: v["number"])
                    assert [v["parent"] for v in versions] == [None, 0, 1, 2]  # sequential

                    server.stop()  # Redis down: the edit is still accepted and applied
                    down = post_edit(client, *FACTS[3])
                    assert wait_job(client, down["job_id"])["status"] == "applied"
                    server.start()
                    back = post_edit(client, *FACTS[4])
                    assert wait_job(client, back["job_id"])["result_version"] == 5
                finally:
                    worker.send_signal(signal.SIGTERM)
                    worker.wait(60)
                assert client.get("/v1/model").json()["version"] == 5
    finally:
        server.stop()
