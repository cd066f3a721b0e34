"""API keys and scopes, limits, metrics and request ids, through the real app."""

from __future__ import annotations

import io
import json
import logging
import subprocess
import sys

from service.auth import KeyStore
from service.ledger.db import make_engine, migrate, session_factory
from service.observability import JsonFormatter, configure_logging

from .service_support import ROOT, post_edit, running_app, wait_job

FACT = ("The mother tongue of {} is", "Danielle Darrieux", "English")
EDIT = {"edit": {"prompt": FACT[0], "subject": FACT[1], "target_new": FACT[2]}}
GENERATE = {"inputs": "Hello", "parameters": {"max_new_tokens": 2}}


def _keys(settings) -> KeyStore:
    url = settings.resolved_database_url
    migrate(url)
    return KeyStore(session_factory(make_engine(url)))


def _bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def test_keys_scopes_and_revocation(tiny_settings):
    settings = tiny_settings(auth="keys")
    store = _keys(settings)
    _, reader = store.create("reader", ["generate"])
    _, editor = store.create("editor", ["edit", "generate"])
    admin_row, admin = store.create("ops", ["admin"])
    with running_app(settings) as client:
        missing = client.post("/v1/generate", json=GENERATE)
        assert missing.status_code == 401 and missing.headers["WWW-Authenticate"] == "Bearer"
        assert missing.json()["type"] == "unauthorized"
        wrong = client.post("/v1/generate", json=GENERATE, headers=_bearer(reader + "x"))
        assert wrong.status_code == 401
        assert client.post("/v1/generate", json=GENERATE, headers=_bearer(reader)).is_success
        forbidden = client.post("/v1/edits", json=EDIT, headers=_bearer(reader))
        assert forbidden.status_code == 403 and forbidden.json()["type"] == "forbidden"
        accepted = client.post("/v1/edits", json=EDIT, headers=_bearer(editor))
        assert accepted.status_code == 202
        job = accepted.json()["job_id"]
        assert client.get(f"/v1/jobs/{job}", headers=_bearer(editor)).is_success
        rollback = {"to_version": 0}
        assert (
            client.post("/v1/rollback", json=rollback, headers=_bearer(editor)).status_code == 403
        )
        assert client.post("/v1/rollback", json=rollback, headers=_bearer(admin)).is_success
        store.revoke(admin_row.prefix)
        assert client.get("/v1/model", headers=_bearer(admin)).status_code == 401
        assert client.get("/healthz").is_success and client.get("/metrics").is_success


def test_keys_command_creates_lists_and_revokes(tiny_settings):
    settings = tiny_settings(auth="keys")
    url = settings.resolved_database_url

    def keys(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "service.cli", "keys", "--database-url", url, *args],
            cwd=ROOT, capture_output=True, text=True, check=False,
        )  # fmt: skip

    created = keys("create", "--name", "ci", "--scopes", "generate,edit")
    assert created.returncode == 0, created.stderr
    meta, plain = created.stdout.strip().splitlines()
    assert json.loads(meta)["scopes"] == ["edit", "generate"] and plain.startswith("es_")
    store = _keys(settings)
    assert store.authenticate(plain).scopes == frozenset({"edit", "generate"})
    listed = keys("list").stdout
    assert "ci" in listed and plain not in listed  # the secret is never shown again
    assert keys("create", "--name", "x", "--scopes", "root").returncode == 2
    assert keys("revoke", json.loads(meta)["id"]).returncode == 0
    assert store.authenticate(plain) is None


def test_rate_limit_queue_depth_and_body_size(tiny_settings):
    settings = tiny_settings(
        run_worker=False, rate_limit_per_minute=4, max_queue_depth=1, max_body_bytes=2_000,
        auth="keys",
    )  # fmt: skip
    _, key = _keys(settings).create("busy", ["edit"])
    with running_app(settings) as client:
        first = client.post("/v1/edits", json=EDIT, headers=_bearer(key))
        assert first.status_code == 202
        full = client.post("/v1/edits", json=EDIT, headers=_bearer(key))
        assert full.status_code == 429 and full.json()["type"] == "queue_full"
        assert int(full.headers["Retry-After"]) > 0
        big = {"edit": {**EDIT["edit"], "prompt": "{} is " + "x" * 3_000}}
        too_big = client.post("/v1/edits", json=big, headers=_bearer(key))
        assert too_big.status_code == 413 and too_big.json()["type"] == "body_too_large"
        codes = [client.get("/v1/model", headers=_bearer(key)).status_code for _ in range(3)]
        assert codes[-1] == 429  # four requests a minute: the fifth and later wait
        assert client.get("/v1/edits", headers=_bearer(key)).headers["Retry-After"]


def test_metrics_and_a_request_id_that_follows_the_job(tiny_settings):
    captured = io.StringIO()
    configure_logging("json", "info")
    logging.getLogger().handlers[0].stream = captured
    try:
        with running_app(tiny_settings()) as client:
            accepted = post_edit(client, *FACT, hparams={"steps": 3})
            reply = client.post("/v1/edits", json=EDIT, headers={"X-Request-ID": "trace-me-42"})
            assert reply.headers["X-Request-ID"] == "trace-me-42"
            job = wait_job(client, reply.json()["job_id"])
            wait_job(client, accepted["job_id"])
            assert job["payload"]["request_id"] == "trace-me-42"
            assert client.post("/v1/generate", json=GENERATE).is_success
            text = client.get("/metrics").text
    finally:
        logging.getLogger().handlers.clear()
    assert 'editserve_http_requests_total{method="POST",route="/v1/edits",status="202"} 2.0' in text
    assert "editserve_generated_tokens_total 2.0" in text
    assert "editserve_model_version 2.0" in text
    assert 'editserve_edit_seconds_count{method="rome",status="applied"} 2.0' in text
    assert "editserve_queue_depth 0.0" in text
    lines = [json.loads(line) for line in captured.getvalue().splitlines() if line.startswith("{")]
    traced = [line for line in lines if line.get("request_id") == "trace-me-42"]
    assert any("applied" in line["message"] and line.get("job_id") for line in traced), traced
    assert isinstance(JsonFormatter().format(logging.makeLogRecord({"msg": "x"})), str)
