"""Many processes on one ledger (real PostgreSQL, real Redis, real OS processes): one writer
chosen by the database lease, fail-over when it is SIGKILLed, followers that serve each
committed version, and a rebase revert killed mid-way."""

from __future__ import annotations

import random
import time

import httpx
import pytest
from sqlalchemy import create_engine, text

from .service_support import (
    ServiceProcess,
    postgres_database,
    require_shared_redis,
    running_app,
    wait_all_ready,
    wait_job,
)

QUICK = {"steps": 5}  # small edits: these tests are about the ledger, not the edit quality
TARGETS = ["English", "French", "Paris", "Rome", "piano", "Tokyo", "guitar", "Peru"]


def _edit_body(index: int, hparams: dict | None = None) -> dict:
    edit = {
        "prompt": "The favourite word of {} is",
        "subject": f"Person {chr(65 + index % 26)}{index}",
        "target_new": TARGETS[index % len(TARGETS)],
    }
    return {"edit": edit, "hparams": hparams or QUICK}


def _sql(database_url: str, query: str) -> list:
    engine = create_engine("postgresql+psycopg://" + database_url.removeprefix("postgresql://"))
    try:
        with engine.connect() as connection:
            return list(connection.execute(text(query)))
    finally:
        engine.dispose()


def _writer_pid(database_url: str) -> int | None:
    rows = _sql(database_url, "SELECT writer FROM lineage")
    if not rows or rows[0][0] is None:
        return None
    return int(rows[0][0].rsplit(":", 2)[1])  # name@host:pid:nonce


def _head(database_url: str) -> int:
    return int(_sql(database_url, "SELECT head FROM lineage")[0][0])


_CLEAN: dict[str, str] = {}


def _clean_checksum(tiny_settings, bodies: list[dict]) -> str:
    """The checksum a single process reaches applying `bodies` in order, uninterrupted."""
    key = repr(bodies)
    if key not in _CLEAN:
        _CLEAN[key] = _run_clean(tiny_settings, bodies)
    return _CLEAN[key]


def _run_clean(tiny_settings, bodies: list[dict]) -> str:
    with running_app(tiny_settings()) as client:
        for body in bodies:
            job = wait_job(client, client.post("/v1/edits", json=body).json()["job_id"])
            assert job["status"] == "applied", job
        return client.get("/v1/model").json()["checksum"]


@pytest.fixture
def cluster(tiny_settings, tmp_path):
    """Starts service processes on one PostgreSQL ledger and the shared Redis."""
    started: list[ServiceProcess] = []
    with postgres_database() as database_url:
        base = tiny_settings(
            database_url=database_url,
            redis_url=require_shared_redis(),
            # the kills come from outside: a job they hit again and again is not a job that
            # crashes its worker, so the crash-loop guard must not give up on it here
            max_job_attempts=1000,
            writer_lease_seconds=2.0,
        )

        def start(kind: str, name: str, **overrides: object) -> ServiceProcess:
            settings = base.model_copy(update={"worker_name": name, **overrides})
            process = ServiceProcess(settings, kind, tmp_path / f"{name}.log").start()
            started.append(process)
            return process

        try:
            yield database_url, start
        finally:
            for process in started:
                process.stop()


def test_one_writer_among_five_processes_survives_ten_kills(cluster, tiny_settings):
    bodies = [_edit_body(i) for i in range(60)]
    expected = _clean_checksum(tiny_settings, bodies)
    database_url, start = cluster
    apis = [start("serve", f"api-{i}") for i in range(3)]
    workers = [start("worker", f"worker-{i}") for i in range(2)]
    processes = apis + workers
    wait_all_ready(processes)
    jobs = []
    for index, body in enumerate(bodies):  # round-robin over the API processes
        reply = httpx.post(f"{apis[index % 3].url}/v1/edits", json=body, timeout=30)
        assert reply.status_code == 202, reply.text
        jobs.append(reply.json()["job_id"])

    chance, kills, restarts = random.Random(20261201), 0, 0
    while kills < 10 and _head(database_url) < len(bodies):
        wanted = _head(database_url) + chance.randint(1, 4)
        deadline = time.monotonic() + 120
        while _head(database_url) < min(wanted, len(bodies) - 1):
            assert time.monotonic() < deadline, "no progress"
            time.sleep(0.01)
        time.sleep(chance.uniform(0.0, 0.1))  # a seeded moment into the next job
        pid = _writer_pid(database_url)
        victim = next((p for p in processes if p.alive() and p.pid == pid), None)
        if victim is None:
            time.sleep(0.05)  # between a death and the take-over: nobody to kill yet
            continue
        victim.kill()
        kills += 1
        replacement = start(victim.kind, f"{victim.kind}-restart-{restarts}")
        restarts += 1
        processes = [p for p in processes if p is not victim] + [replacement]
        if victim in apis:
            apis = [p for p in apis if p is not victim] + [replacement]
    assert kills == 10, f"only {kills} kills before the edits ran out"

    wait_all_ready([apis[0]])
    finished = [wait_job(_Client(apis[0].url), job_id, timeout=300) for job_id in jobs]
    assert [job["status"] for job in finished] == ["applied"] * len(bodies), finished
    versions = _sql(database_url, "SELECT number, parent, job_id FROM versions ORDER BY number")
    assert [(n, p) for n, p, _ in versions] == [(0, None)] + [(n, n - 1) for n in range(1, 61)]
    assert sorted(job_id for _, _, job_id in versions if job_id) == jobs  # each once
    wait_all_ready(apis)
    for api in apis:  # every API process serves the head, whoever wrote it
        deadline = time.monotonic() + 30
        while (model := httpx.get(f"{api.url}/v1/model").json())["version"] != 60:
            assert time.monotonic() < deadline, model
            time.sleep(0.1)
        assert model["checksum"] == expected


def test_followers_serve_each_version_as_it_commits(cluster):
    _, start = cluster
    writer = start("serve", "writer")
    followers = [start("serve", f"follower-{i}", run_worker=False) for i in range(2)]
    wait_all_ready([writer, *followers])
    for follower in followers:
        ready = httpx.get(f"{follower.url}/readyz").json()
        assert ready["role"] == "follower" and ready["lag"] == 0
    assert httpx.get(f"{writer.url}/readyz").json()["role"] == "writer"
    client = _Client(writer.url)
    for index in range(5):
        job = wait_job(client, client.post("/v1/edits", json=_edit_body(index)).json()["job_id"])
        assert job["status"] == "applied", job
        for follower in followers:
            # /readyz reads what the follower serves without catching up itself: the
            # version must arrive by the follower's own notice or poll
            deadline = time.monotonic() + 5
            while (ready := httpx.get(f"{follower.url}/readyz").json())["version"] != job[
                "result_version"
            ]:
                assert time.monotonic() < deadline, ready
                time.sleep(0.02)
            answer = httpx.post(
                f"{follower.url}/v1/generate",
                json={"inputs": "The favourite word of", "parameters": {"max_new_tokens": 2}},
            ).json()
            assert answer["model_version"] == job["result_version"], answer
    writer_model = httpx.get(f"{writer.url}/v1/model").json()
    for follower in followers:
        model = httpx.get(f"{follower.url}/v1/model").json()
        assert (model["version"], model["checksum"], model["role"]) == (
            writer_model["version"],
            writer_model["checksum"],
            "follower",
        )


@pytest.mark.parametrize("kill_at_percent", [0.0, 60.0])
def test_a_rebase_killed_mid_way_ends_with_exactly_the_remaining_edits(
    cluster, tiny_settings, kill_at_percent
):
    slow = {"steps": 60, "stop_nll": 1e-9}  # edits long enough to be killed inside
    bodies = [_edit_body(i, slow) for i in range(5)]
    expected = _clean_checksum(tiny_settings, bodies[:1] + bodies[2:])  # without edit 1
    database_url, start = cluster
    api = start("serve", "api", run_worker=False)
    worker = start("worker", "worker-a")
    wait_all_ready([api, worker])
    client = _Client(api.url)
    edit_ids = []
    for body in bodies:
        reply = client.post("/v1/edits", json=body).json()
        assert wait_job(client, reply["job_id"])["status"] == "applied"
        edit_ids.append(reply["edit_ids"][0])
    job_id = client.post(
        f"/v1/edits/{edit_ids[1]}/revert", json={"mode": "rebase", "wait": False}
    ).json()["id"]
    deadline = time.monotonic() + 120
    while True:  # the rebase recomputes edits 2-4; kill it this far in
        job = client.get(f"/v1/jobs/{job_id}").json()
        if job["status"] == "running" and job["percent"] >= kill_at_percent:
            break
        assert job["status"] in ("queued", "running") and time.monotonic() < deadline, job
        time.sleep(0.002)
    worker.kill()
    assert _head(database_url) in (5, 9)  # nothing of the rebase, or all of it
    start("worker", "worker-b")
    job = wait_job(client, job_id, timeout=300)
    assert job["status"] == "applied", job
    model = client.get("/v1/model").json()
    deadline = time.monotonic() + 30
    while model["version"] != job["result_version"]:
        assert time.monotonic() < deadline, model
        time.sleep(0.1)
        model = client.get("/v1/model").json()
    assert model["checksum"] == expected
    live = {e["id"] for e in client.get("/v1/edits", params={"limit": 50}).json()["edits"]
            if e["live"]}  # fmt: skip
    assert live == set(edit_ids) - {edit_ids[1]}


class _Client:
    """The few calls wait_job and the tests make, over real HTTP."""

    def __init__(self, url: str) -> None:
        self.url = url

    def get(self, path: str, **kwargs: object) -> httpx.Response:
        return httpx.get(f"{self.url}{path}", timeout=30, **kwargs)  # type: ignore[arg-type]

    def post(self, path: str, **kwargs: object) -> httpx.Response:
        return httpx.post(f"{self.url}{path}", timeout=30, **kwargs)  # type: ignore[arg-type]


def test_a_follower_that_cannot_read_a_blob_stays_at_its_last_good_version(cluster, tmp_path):
    _, start = cluster
    shared, unreachable = tmp_path / "blobs-writer", tmp_path / "blobs-follower"
    unreachable.mkdir()
    writer = start("serve", "writer", blob_store="filesystem", blob_dir=shared)
    follower = start(
        "serve", "follower", run_worker=False, blob_store="filesystem", blob_dir=unreachable
    )
    wait_all_ready([writer, follower])
    client = _Client(writer.url)
    job = wait_job(client, client.post("/v1/edits", json=_edit_body(0)).json()["job_id"])
    assert job["status"] == "applied", job
    deadline = time.monotonic() + 10
    while not (ready := httpx.get(f"{follower.url}/readyz").json())["follow_error"]:
        assert time.monotonic() < deadline, ready
        time.sleep(0.05)
    assert "missing" in ready["follow_error"] and ready["lag"] == 1 and ready["version"] == 0
    answer = httpx.post(f"{follower.url}/v1/generate", json={"inputs": "Hi"}).json()
    assert answer["model_version"] == 0  # it serves the last version it could build
    for blob in shared.rglob("*.safetensors"):  # the blob becomes readable: it catches up
        target = unreachable / blob.relative_to(shared)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(blob.read_bytes())
    deadline = time.monotonic() + 10
    while (ready := httpx.get(f"{follower.url}/readyz").json())["version"] != 1:
        assert time.monotonic() < deadline, ready
        time.sleep(0.05)
    assert ready["follow_error"] is None and ready["lag"] == 0
    assert ready["checksum"] == httpx.get(f"{writer.url}/v1/model").json()["checksum"]
