"""A first start that just works: an admin key made and shown once, a per-user data dir,
a start-up the log narrates, and /readyz saying `starting` until it is done."""

from __future__ import annotations

import logging
import os
import re
import stat
import subprocess
import sys
import threading
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
from fastapi.testclient import TestClient

from service.api.app import create_app
from service.auth import ADMIN_KEY_FILE, FIRST_ADMIN_KEY_ID, KeyStore
from service.config import Settings
from service.ledger.db import make_engine, migrate, session_factory
from service.state import ServiceState

from .service_support import ROOT, ServiceProcess, postgres_database, wait_all_ready

FIRST_KEY = re.compile(r"First start: created admin API key (es_\S+) \(also in (\S+)\)")


def _keys(url: str) -> KeyStore:
    migrate(url)
    return KeyStore(session_factory(make_engine(url)))


def _first_keys(log: Path) -> list[tuple[str, str]]:
    return FIRST_KEY.findall(log.read_text(errors="replace"))


def _model(process: ServiceProcess, key: str | None) -> int:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.get(f"{process.url}/v1/model", headers=headers, timeout=30).status_code


def test_a_first_start_makes_one_admin_key_and_a_second_start_none(tiny_settings, tmp_path):
    # a cache of its own: the statistics are computed here, so their progress is logged
    settings = tiny_settings(auth="keys", log_format="text", cache_dir=tmp_path / "cache")
    first = ServiceProcess(settings, "serve", tmp_path / "first.log", log_level=None).start()
    try:
        wait_all_ready([first])
        [(key, where)] = _first_keys(first.log)
        path = settings.data_dir.absolute() / ADMIN_KEY_FILE
        assert Path(where) == path and path.read_text() == key + "\n"
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert _model(first, key) == 200 and _model(first, None) == 401
    finally:
        first.stop()
    log = first.log.read_text()
    stages = [
        "start-up: loading the model",
        "start-up: hashing the base weights",
        "start-up: statistics for layers",
        ", 100 %",
        "start-up: replaying the ledger",
        "ready at version",
        "start-up: done; serving version",
    ]
    positions = [log.find(stage) for stage in stages]
    assert -1 not in positions and positions == sorted(positions), log[-3000:]
    assert " INFO " in log  # the default level of `editserve serve` shows them

    before = (path.read_bytes(), path.stat().st_mtime_ns)
    second = ServiceProcess(settings, "serve", tmp_path / "second.log").start()
    try:
        wait_all_ready([second])
        assert _first_keys(second.log) == []
        assert _model(second, key) == 200
    finally:
        second.stop()
    assert (path.read_bytes(), path.stat().st_mtime_ns) == before
    assert [row.id for row in _keys(settings.resolved_database_url).list()] == [FIRST_ADMIN_KEY_ID]


def test_processes_starting_together_on_postgresql_make_exactly_one_key(tiny_settings, tmp_path):
    with postgres_database() as url:
        settings = tiny_settings(auth="keys", database_url=url, precompute_statistics=False)
        processes = [
            ServiceProcess(
                settings.model_copy(update={"worker_name": f"api-{i}"}),
                "serve",
                tmp_path / f"api-{i}.log",
            )
            for i in range(2)
        ]
        try:
            for process in processes:
                process.start()
            wait_all_ready(processes)
            shown = [key for process in processes for key, _ in _first_keys(process.log)]
            assert len(shown) == 1
            assert all(_model(process, shown[0]) == 200 for process in processes)
        finally:
            for process in processes:
                process.stop()
        assert len(_keys(url).list()) == 1


@pytest.mark.parametrize("database", ["sqlite", "postgresql"])
def test_racing_first_admin_creations_make_one_key(database, tmp_path):
    def race(url: str) -> list[str | None]:
        _keys(url)  # the schema, before the race
        stores = [KeyStore(session_factory(make_engine(url))) for _ in range(6)]
        barrier = threading.Barrier(len(stores))
        made: list[str | None] = []

        def create(store: KeyStore) -> None:
            barrier.wait()
            made.append(store.create_first_admin())

        threads = [threading.Thread(target=create, args=(store,)) for store in stores]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert len(made) == len(stores)
        assert len(_keys(url).list()) == 1
        return made

    if database == "sqlite":
        made = race(f"sqlite:///{tmp_path / 'ledger.db'}")
    else:
        with postgres_database() as url:
            made = race(url)
    assert len([key for key in made if key is not None]) == 1


def _not_booting(monkeypatch: pytest.MonkeyPatch) -> None:
    """The app's boot thread never starts: it stays `starting`, with no model loaded."""
    monkeypatch.setattr(ServiceState, "boot_in_background", lambda self, run_worker: None)


def test_a_ledger_with_a_key_already_gets_no_first_key(tmp_path, capfd, monkeypatch):
    settings = Settings(data_dir=tmp_path / "data", auth="keys")
    _keys(settings.resolved_database_url).create("mine", ["generate"])
    _not_booting(monkeypatch)
    with TestClient(create_app(settings)):
        pass
    assert "First start" not in capfd.readouterr().err
    assert not (settings.data_dir / ADMIN_KEY_FILE).exists()


def test_readyz_says_starting_while_the_model_loads(tmp_path, monkeypatch):
    _not_booting(monkeypatch)
    with TestClient(create_app(Settings(data_dir=tmp_path, auth="open"))) as client:
        reply = client.get("/readyz")
    body = reply.json()
    assert reply.status_code == 503 and not body["ready"]
    assert body["role"] == "starting" and body["stage"] == "loading the model"
    assert "worker" not in body and body["version"] is None


def test_statistics_progress_is_logged_every_ten_percent(caplog):
    from service.engine.engine import Engine
    from service.engine.model_runner import RunnerState

    engine = SimpleNamespace(state=RunnerState(), _logged_progress=("", 0))
    with caplog.at_level(logging.INFO, logger="service.engine.engine"):
        for step in range(201):
            Engine._report(engine, step / 200, "statistics for layers [1]")  # type: ignore[arg-type]
    logged = [r.getMessage() for r in caplog.records]
    assert logged == [f"start-up: statistics for layers [1], {p} %"
                      for p in range(0, 101, 10)]  # fmt: skip
    assert engine.state.stage == "statistics: statistics for layers [1] (100 %)"


def test_the_data_dir_is_per_user_whatever_the_working_directory(tmp_path):
    home = tmp_path / "home"
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDITSERVE_")}
    env.pop("XDG_DATA_HOME", None)
    env.update(HOME=str(home), EDITSERVE_CACHE_DIR=str(tmp_path / "cache"))

    def keys(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
        cwd.mkdir(parents=True, exist_ok=True)
        return subprocess.run(
            [sys.executable, "-m", "service.cli", "keys", *args],
            cwd=cwd, env={**env, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True,
            check=False,
        )  # fmt: skip

    created = keys(tmp_path / "one", "create", "--name", "from-one", "--scopes", "admin")
    assert created.returncode == 0, created.stderr
    assert (home / ".local" / "share" / "editserve" / "ledger.db").is_file()
    old = tmp_path / "two" / "editserve-data"
    old.mkdir(parents=True)
    (old / "ledger.db").touch()  # a ledger the old relative default left behind
    listed = keys(tmp_path / "two", "list")
    assert "from-one" in listed.stdout, listed.stderr
    assert "EDITSERVE_DATA_DIR" in listed.stderr  # said, not silently ignored
    assert not (tmp_path / "one" / "editserve-data").exists()


def test_the_default_data_dir_is_absolute(monkeypatch, tmp_path):
    monkeypatch.delenv("EDITSERVE_DATA_DIR", raising=False)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path))
    assert Settings().data_dir == tmp_path / "editserve"
    monkeypatch.setenv("XDG_DATA_HOME", "relative")  # the XDG spec says to ignore it
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert Settings().data_dir == tmp_path / "home" / ".local" / "share" / "editserve"
