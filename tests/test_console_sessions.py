"""The console's cookie session through the real app: what the cookie is, what it allows,
and what it refuses (no cookie, no CSRF header, another origin, a revoked key, an expiry)."""

from __future__ import annotations

from datetime import timedelta

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import update

from service.ledger.schema import ConsoleSession, utcnow
from service.sessions import COOKIE_NAME

from .service_support import running_app, wait_job


@pytest.fixture
def keyed(tiny_settings):
    with running_app(tiny_settings(auth="keys")) as http:
        state = http.app.state.service  # type: ignore[attr-defined]
        _, admin = state.keys.create("console admin", ["admin"])
        _, reader = state.keys.create("reader", ["generate"])
        yield http, state, admin, reader


def _sign_in(http: TestClient, key: str) -> dict:
    reply = http.post("/console/session", json={"api_key": key})
    assert reply.status_code == 200, reply.json()
    return {**reply.json(), "set-cookie": reply.headers["set-cookie"]}


def test_the_console_page_and_its_assets_are_served_with_no_external_url(tiny_settings):
    with running_app(tiny_settings(auth="keys")) as http:
        page = http.get("/console")
        assert page.status_code == 200 and "text/html" in page.headers["content-type"]
        assert "default-src 'self'" in page.headers["content-security-policy"]
        for asset in ("console.js", "console.css"):
            reply = http.get(f"/console/assets/{asset}")
            assert reply.status_code == 200 and len(reply.text) > 1000
            assert "http://" not in reply.text and "https://" not in reply.text
        assert "https://" not in page.text and "http://" not in page.text


def test_signing_in_sets_an_httponly_strict_cookie_that_acts_with_the_key_s_scopes(keyed):
    http, _, _, reader = keyed
    session = _sign_in(http, reader)
    assert session["key_name"] == "reader" and session["scopes"] == ["generate"]
    raw = session["set-cookie"]
    assert raw.startswith(f"{COOKIE_NAME}=") and "Path=/" in raw
    assert "HttpOnly" in raw and "SameSite=strict" in raw and "Secure" not in raw  # plain http
    assert http.get("/console/session").json()["key_name"] == "reader"
    # the cookie authenticates the API, with the key's scopes only
    assert http.post("/v1/generate", json={"inputs": "a"}).status_code == 403  # no CSRF header
    headers = {"X-CSRF-Token": session["csrf_token"]}
    generated = http.post(
        "/v1/generate", json={"inputs": "a", "parameters": {"max_new_tokens": 2}}, headers=headers
    )
    assert generated.status_code == 200, generated.json()
    assert http.get("/v1/model").status_code == 200
    assert http.post("/v1/rollback", json={"to_version": 0}, headers=headers).status_code == 403


def test_no_cookie_no_csrf_header_or_another_origin_is_refused(keyed):
    http, state, admin, _ = keyed
    session = _sign_in(http, admin)
    csrf = {"X-CSRF-Token": session["csrf_token"]}
    body = {"edit": {"prompt": "The capital of {} is", "subject": "Zorbia", "target_new": "Q"}}
    assert http.post("/v1/edits", json=body).status_code == 403
    wrong = http.post("/v1/edits", json=body, headers={"X-CSRF-Token": "0" * 64})
    assert wrong.status_code == 403 and wrong.json()["type"] == "csrf"
    foreign = http.post(
        "/v1/edits", json=body, headers={**csrf, "Origin": "https://elsewhere.example"}
    )
    assert foreign.status_code == 403 and "cross-origin" in foreign.json()["error"]
    assert state.ledger.head().number == 0 and state.ledger.pending_job_count() == 0
    accepted = http.post("/v1/edits", json=body, headers={**csrf, "Origin": "http://testserver"})
    assert accepted.status_code == 202, accepted.json()
    assert wait_job(http, accepted.json()["job_id"])["status"] == "applied"
    with TestClient(http.app) as stranger:  # no cookie at all
        assert stranger.get("/v1/model").status_code == 401
        assert stranger.get("/console/session").status_code == 401


def test_a_wrong_key_cannot_sign_in_and_the_error_names_the_field(keyed):
    http, _, _, _ = keyed
    reply = http.post("/console/session", json={"api_key": "es_0123_not-a-key"})
    assert reply.status_code == 401 and reply.json()["field"] == "api_key"
    assert COOKIE_NAME not in reply.headers.get("set-cookie", "")
    empty = http.post("/console/session", json={"api_key": ""})
    assert empty.status_code == 422 and empty.json()["field"] == "api_key"


def test_sign_out_a_revoked_key_and_an_expired_session_end_the_session(keyed):
    http, state, admin, reader = keyed
    session = _sign_in(http, admin)
    assert http.delete("/console/session").status_code == 403  # needs the CSRF header
    out = http.delete("/console/session", headers={"X-CSRF-Token": session["csrf_token"]})
    assert out.status_code == 204
    assert http.get("/v1/model").status_code == 401

    _sign_in(http, reader)
    state.keys.revoke(state.keys.authenticate(reader).key_id)
    assert http.get("/v1/model").status_code == 401

    _sign_in(http, admin)
    with state.ledger.sessions.begin() as db:
        db.execute(update(ConsoleSession).values(expires_at=utcnow() - timedelta(seconds=1)))
    assert http.get("/v1/model").status_code == 401
