"""`editserve serve`: the real server process over real HTTP, configured by environment."""

from __future__ import annotations

import subprocess
import sys
import time

import httpx

from .service_support import ROOT, free_port, settings_env


def test_serve_answers_over_http_and_refuses_requests_without_a_key(tiny_settings, tmp_path):
    port = free_port()
    settings = tiny_settings(auth="keys", port=port, log_format="json")
    log = tmp_path / "serve.log"
    server = subprocess.Popen(
        [sys.executable, "-m", "service.cli", "serve", "--log-level", "info"],
        cwd=ROOT,
        env=settings_env(settings),
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            assert server.poll() is None, log.read_text()
            try:
                if httpx.get(f"{url}/readyz").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        assert httpx.get(f"{url}/healthz").json() == {"status": "ok"}
        refused = httpx.post(f"{url}/v1/generate", json={"inputs": "Hi"})
        assert refused.status_code == 401 and refused.json()["type"] == "unauthorized"
        assert "editserve_http_requests_total" in httpx.get(f"{url}/metrics").text
    finally:
        server.terminate()
        server.wait(60)
    lines = log.read_text()
    assert "Application shutdown complete." in lines  # SIGTERM shuts down cleanly
    assert '"level": "info"' in lines  # JSON log lines
