"""Helpers for the service tests: real databases, Redis servers, running apps and workers."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import psycopg
import redis
from fastapi.testclient import TestClient

from service.api.app import create_app
from service.config import Settings

ROOT = Path(__file__).resolve().parents[1]
POSTGRES_ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"
SHARED_REDIS = "redis://127.0.0.1:6379/0"


@contextlib.contextmanager
def postgres_database() -> Iterator[str]:
    """A fresh database on the machine's PostgreSQL, dropped afterwards."""
    name = f"editserve_test_{uuid.uuid4().hex[:12]}"
    try:
        admin = psycopg.connect(POSTGRES_ADMIN, autocommit=True)
    except psycopg.OperationalError as exc:
        raise RuntimeError(f"PostgreSQL at 127.0.0.1:5432 is required: {exc}") from exc
    with admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"postgresql://postgres@127.0.0.1:5432/{name}"
    finally:
        with psycopg.connect(POSTGRES_ADMIN, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def require_shared_redis() -> str:
    try:
        redis.Redis.from_url(SHARED_REDIS).ping()
    except redis.RedisError as exc:
        raise RuntimeError(f"Redis at 127.0.0.1:6379 is required: {exc}") from exc
    return SHARED_REDIS


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class RedisServer:
    """A private redis-server on a free port, for tests that flush or restart it."""

    def __init__(self, folder: Path) -> None:
        self.folder, self.port = folder, free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is required for this test")
        self.folder.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.folder)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        client = redis.Redis.from_url(self.url)
        for _ in range(100):
            with contextlib.suppress(redis.RedisError):
                if client.ping():
                    return
            time.sleep(0.05)
        raise RuntimeError("private redis-server did not start")

    def stop(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None


def service_settings(
    folder: Path,
    model: Path | str,
    database_url: str | None = None,
    redis_url: str | None = None,
    **overrides: object,
) -> Settings:
    values: dict[str, object] = {
        "model": str(model),
        "data_dir": folder / "data",
        "database_url": database_url,
        "redis_url": redis_url,
        "queue_name": f"editserve-test-{uuid.uuid4().hex[:8]}",
        "queue_poll_seconds": 0.2,
        "auth": "open",
        "log_format": "text",
        # a random tiny model's near-flat predictions flip under any edit, so the guard
        # would refuse everything; the SmolLM2 tests switch it on (guard=True)
        "guard": False,
    }
    values.update(overrides)
    return Settings(**values)  # type: ignore[arg-type]


def settings_env(settings: Settings) -> dict[str, str]:
    """The same settings as EDITSERVE_* variables, for a subprocess."""
    env = dict(os.environ)
    for name, value in settings.model_dump().items():
        if value is not None:
            env[f"EDITSERVE_{name.upper()}"] = str(value)
    return env


def wait_ready(client: TestClient, timeout: float = 600.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        reply = client.get("/readyz")
        if reply.status_code == 200:
            return reply.json()
        if "failed" in str(reply.json().get("stage")) or "Error" in str(reply.json()["stage"]):
            raise AssertionError(f"service failed to start: {reply.json()}")
        time.sleep(0.05)
    raise AssertionError("service did not become ready")


@contextlib.contextmanager
def running_app(settings: Settings) -> Iterator[TestClient]:
    """The real app with its lifespan (model load, ledger replay, worker), ready to use."""
    with TestClient(create_app(settings)) as client:
        wait_ready(client)
        yield client


def wait_job(client: TestClient, job_id: int, timeout: float = 600.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(f"/v1/jobs/{job_id}").json()
        if job["status"] not in ("queued", "running"):
            return job
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} did not finish: {job}")


def post_edit(client: TestClient, prompt: str, subject: str, target: str, **extra: object) -> dict:
    reply = client.post(
        "/v1/edits",
        json={"edit": {"prompt": prompt, "subject": subject, "target_new": target}, **extra},
    )
    assert reply.status_code == 202, reply.json()
    return reply.json()


def start_worker(settings: Settings, log: Path) -> subprocess.Popen[bytes]:
    """`editserve worker` in its own process."""
    return subprocess.Popen(
        [sys.executable, "-m", "service.cli", "worker", "--log-level", "warning"],
        cwd=ROOT,
        env=settings_env(settings),
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
    )


class PostgresServer:
    """A private PostgreSQL cluster (initdb in a temp folder, run as the postgres user),
    for tests that stop and restart the database."""

    def __init__(self) -> None:
        # a folder of its own under /tmp: pytest's temporary folders are private to root
        self.folder, self.port = Path(tempfile.mkdtemp(prefix="editserve-pg-")), free_port()
        self.data = self.folder / "pgdata"
        bins = sorted(Path("/usr/lib/postgresql").glob("*/bin"))
        if not bins:
            raise RuntimeError("PostgreSQL server binaries are required for this test")
        self.bin = bins[-1]

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *args: str) -> None:
        command = ["runuser", "-u", "postgres", "--", *args] if os.geteuid() == 0 else list(args)
        subprocess.run(command, check=True, capture_output=True)

    def init(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            shutil.chown(self.folder, "postgres")
        self._run(str(self.bin / "initdb"), "-D", str(self.data), "-A", "trust", "-U", "postgres")

    def start(self) -> None:
        options = f"-p {self.port} -k {self.folder} -c listen_addresses=127.0.0.1"
        log = str(self.folder / "server.log")  # the server must not hold our pipes open
        self._run(
            str(self.bin / "pg_ctl"), "-D", str(self.data), "-l", log, "-o", options, "-w", "start"
        )

    def stop(self) -> None:
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop")

    def remove(self) -> None:
        with contextlib.suppress(subprocess.CalledProcessError):
            self.stop()
        shutil.rmtree(self.folder, ignore_errors=True)


class ServiceProcess:
    """`editserve serve` (an API process) or `editserve worker` in its own OS process."""

    def __init__(
        self, settings: Settings, kind: str, log: Path, log_level: str | None = "warning"
    ) -> None:
        """`log_level` None: the command's own default."""
        self.settings, self.kind, self.log, self.log_level = settings, kind, log, log_level
        self.port = free_port() if kind == "serve" else None
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> ServiceProcess:
        command = [sys.executable, "-m", "service.cli", self.kind]
        if self.log_level is not None:
            command += ["--log-level", self.log_level]
        if self.port is not None:
            command += ["--port", str(self.port)]
        self.process = subprocess.Popen(
            command,
            cwd=ROOT,
            env=settings_env(self.settings),
            stdout=self.log.open("ab"),
            stderr=subprocess.STDOUT,
        )
        return self

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def ready(self) -> bool:
        if not self.alive():
            raise AssertionError(f"{self.kind} process exited: {self.log.read_text()[-3000:]}")
        if self.port is None:
            return b"ready at version" in self.log.read_bytes()
        try:
            return httpx.get(f"{self.url}/readyz", timeout=5).status_code == 200
        except httpx.HTTPError:
            return False

    def kill(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait()

    def stop(self) -> None:
        if self.alive():
            assert self.process is not None
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()


def wait_all_ready(processes: list[ServiceProcess], timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    for process in processes:
        while not process.ready():
            assert time.monotonic() < deadline, f"{process.kind} did not become ready"
            time.sleep(0.1)
