"""`editserve serve` in a subprocess for the HTTP benchmarks: a fresh SQLite ledger, open
mode (no keys) and no rate limit, on a free port."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def running_server(model: str, ready_timeout: float = 1800.0) -> Iterator[str]:
    """The server's base URL once `/readyz` answers 200 (it may first compute statistics)."""
    port = _free_port()
    env = {
        **os.environ,
        "EDITSERVE_MODEL": model,
        "EDITSERVE_DATA_DIR": tempfile.mkdtemp(prefix="editserve-bench-"),
        "EDITSERVE_PORT": str(port),
        "EDITSERVE_AUTH": "open",
        "EDITSERVE_RATE_LIMIT_PER_MINUTE": "0",
    }
    server = subprocess.Popen(
        [sys.executable, "-m", "service.cli", "serve", "--log-level", "warning"],
        env=env,
        cwd=Path(__file__).resolve().parents[1],
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + ready_timeout
        while True:
            if server.poll() is not None:
                raise RuntimeError(f"the server exited with status {server.returncode}")
            if time.monotonic() > deadline:
                raise RuntimeError("the server did not become ready")
            try:
                if httpx.get(f"{url}/readyz").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        yield url
    finally:
        server.terminate()
        server.wait(60)
