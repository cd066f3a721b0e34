"""Many processes on one ledger: how soon each follower serves a committed edit, and how
soon a standby runs the next job after the writer is SIGKILLed. Prints JSON figures.

    python bench/bench_followers.py --edits 20 --followers 3 --failovers 3

A writer (`editserve serve`), `--followers` API processes with EDITSERVE_RUN_WORKER=false and
a standby `editserve worker` share a fresh PostgreSQL database and Redis. For each ROME edit
(CounterFact train cases), visibility is the time from the version row's creation in the
writer to the moment each follower serves that version (its /readyz `version_since`; all
processes share this machine's clock). For a fail-over, an edit is accepted, the writer is
SIGKILLed, and the figure is the time from the kill to the job's start in the ledger.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx
import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.provenance import ROOT, provenance
from service.config import Settings

DATA = ROOT.parent / "shared" / "data"
ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Process:
    def __init__(self, kind: str, env: dict[str, str], name: str, log_dir: Path) -> None:
        self.kind, self.port = kind, _free_port() if kind == "serve" else None
        command = [sys.executable, "-m", "service.cli", kind, "--log-level", "warning"]
        if self.port:
            command += ["--port", str(self.port)]
        self.log = log_dir / f"{name}.log"
        env = {**env, "EDITSERVE_WORKER_NAME": name}
        self.popen = subprocess.Popen(
            command, cwd=ROOT, env=env, stdout=self.log.open("wb"), stderr=subprocess.STDOUT
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def ready(self) -> bool:
        if self.popen.poll() is not None:
            raise RuntimeError(f"{self.kind} exited: {self.log.read_text()[-2000:]}")
        if self.port is None:
            return b"ready at version" in self.log.read_bytes()
        with contextlib.suppress(httpx.HTTPError):
            return httpx.get(f"{self.url}/readyz", timeout=5).status_code == 200
        return False

    def wait_ready(self, timeout: float = 1800) -> None:
        deadline = time.monotonic() + timeout
        while not self.ready():
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.kind} did not become ready")
            time.sleep(0.2)

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(30)
            except subprocess.TimeoutExpired:
                self.popen.kill()


def _cases(count: int) -> list[dict]:
    with (DATA / "counterfact" / "counterfact-train.json").open(encoding="utf-8") as handle:
        rows = json.load(handle)[:count]
    return [{k: r[k] for k in ("prompt", "subject", "target_new")} for r in rows]


def _sql(url: str, query: str, *args: object) -> list[tuple]:
    with psycopg.connect(url) as connection:
        return list(connection.execute(query, args))


def _wait_job(url: str, job_id: int, timeout: float = 600) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = httpx.get(f"{url}/v1/jobs/{job_id}", timeout=30).json()
        if job["status"] not in ("queued", "running"):
            return job
        time.sleep(0.05)
    raise RuntimeError(f"job {job_id} did not finish")


def _summary(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {
        "p50": round(statistics.median(ordered), 4),
        "p90": round(ordered[int(0.9 * (len(ordered) - 1))], 4),
        "max": round(ordered[-1], 4),
        "count": len(ordered),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--edits", type=int, default=20)
    parser.add_argument("--followers", type=int, default=3)
    parser.add_argument("--failovers", type=int, default=3)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    args = parser.parse_args()

    database = f"editserve_bench_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(ADMIN, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{database}"')
    database_url = f"postgresql://postgres@127.0.0.1:5432/{database}"
    folder = Path(tempfile.mkdtemp(prefix="editserve-bench-"))
    env = {
        **os.environ,
        "EDITSERVE_MODEL": args.model,
        "EDITSERVE_DATA_DIR": str(folder),
        "EDITSERVE_DATABASE_URL": database_url,
        "EDITSERVE_REDIS_URL": args.redis_url,
        "EDITSERVE_QUEUE_NAME": f"bench-{uuid.uuid4().hex[:8]}",
        "EDITSERVE_AUTH": "open",
        "EDITSERVE_RATE_LIMIT_PER_MINUTE": "0",
        "EDITSERVE_GUARD": "false",
        "EDITSERVE_QUEUE_POLL_SECONDS": "0.2",
    }
    processes: list[Process] = []
    try:
        writer = Process("serve", env, "writer", folder)
        processes.append(writer)
        writer.wait_ready()  # the first process computes what the others then read
        followers = [
            Process("serve", {**env, "EDITSERVE_RUN_WORKER": "false"}, f"follower-{i}", folder)
            for i in range(args.followers)
        ]
        processes += followers
        for follower in followers:
            follower.wait_ready()
        visible: list[float] = []
        for case in _cases(args.edits):
            reply = httpx.post(f"{writer.url}/v1/edits", json={"edit": case}, timeout=30).json()
            job = _wait_job(writer.url, reply["job_id"])
            if job["status"] != "applied":
                continue
            number = job["result_version"]
            committed = _sql(
                database_url, "SELECT created_at FROM versions WHERE number = %s", number
            )[0][0].timestamp()
            for follower in followers:
                deadline = time.monotonic() + 30
                while (ready := httpx.get(f"{follower.url}/readyz").json())["version"] < number:
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"a follower never served version {number}")
                    time.sleep(0.005)
                visible.append(ready["version_since"] - committed)

        failover: list[float] = []
        current = writer
        for trial in range(args.failovers):
            standby = Process("worker", env, f"standby-{trial}", folder)
            processes.append(standby)
            standby.wait_ready()
            case = _cases(args.edits + trial + 1)[-1]
            job_id = httpx.post(
                f"{followers[0].url}/v1/edits", json={"edit": case}, timeout=30
            ).json()["job_id"]
            time.sleep(0.5)  # the writer has begun it
            killed_at = time.time()
            current.popen.send_signal(signal.SIGKILL)
            current.popen.wait()
            deadline = time.monotonic() + 60
            while True:
                (started, claimed_by, status) = _sql(
                    database_url,
                    "SELECT started_at, claimed_by, status FROM jobs WHERE id = %s",
                    job_id,
                )[0]
                if claimed_by and claimed_by.startswith(f"standby-{trial}@") and started:
                    failover.append(started.timestamp() - killed_at)
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"no standby took job {job_id} ({status})")
                time.sleep(0.02)
            _wait_job(followers[0].url, job_id)
            current = standby
        print(
            json.dumps(
                {
                    **provenance(),
                    "model": args.model,
                    "followers": args.followers,
                    "edit_visible_on_follower_seconds": _summary(visible),
                    "failover_next_job_started_seconds": _summary(failover),
                    "writer_lease_seconds": Settings.model_fields["writer_lease_seconds"].default,
                },
                indent=2,
            )
        )
    finally:
        for process in processes:
            process.stop()
        with psycopg.connect(ADMIN, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')


if __name__ == "__main__":
    main()
