"""/v1/generate with `version`: an earlier version's answer, computed on the edit workspace,
which then returns to the head (the next edit is computed on the head's weights)."""

from __future__ import annotations

from .service_support import post_edit, running_app, wait_job

PROMPT = "The mother tongue of Danielle Darrieux is"


def _generate(http, **extra: object) -> dict:
    body = {"inputs": PROMPT, "parameters": {"max_new_tokens": 6}, **extra}
    reply = http.post("/v1/generate", json=body)
    assert reply.status_code == 200, reply.json()
    return reply.json()


def test_an_earlier_version_answers_beside_the_head(tiny_settings):
    with running_app(tiny_settings()) as http:
        base = _generate(http)
        first = post_edit(http, "The mother tongue of {} is", "Danielle Darrieux", "English")
        assert wait_job(http, first["job_id"])["status"] == "applied"
        head = _generate(http)
        assert head["model_version"] == 1 and head["generated_text"] != base["generated_text"]
        earlier = _generate(http, version=0)
        assert earlier == {**base, "model_version": 0}
        assert _generate(http, version=1) == head  # the served version: served as usual

        # the workspace went back to the head: the next edit is on version 1's weights
        second = post_edit(http, "{} was born in", "Danielle Darrieux", "Berlin")
        job = wait_job(http, second["job_id"])
        assert job["status"] == "applied" and job["result_version"] == 2
        versions = {v["number"]: v for v in http.get("/v1/versions").json()}
        assert versions[2]["parent"] == 1
        assert http.get("/v1/model").json()["checksum"] == versions[2]["checksum"]


def test_a_missing_version_or_a_stream_at_a_version_is_refused(tiny_settings):
    with running_app(tiny_settings()) as http:
        missing = http.post("/v1/generate", json={"inputs": PROMPT, "version": 7})
        assert missing.status_code == 404 and missing.json()["field"] == "version"
        negative = http.post("/v1/generate", json={"inputs": PROMPT, "version": -1})
        assert negative.status_code == 422 and negative.json()["field"] == "version"
        stream = http.post("/v1/generate_stream", json={"inputs": PROMPT, "version": 3})
        assert stream.status_code == 422 and stream.json()["field"] == "version"
