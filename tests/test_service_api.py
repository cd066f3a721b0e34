"""The HTTP API through the app's real lifespan, on the tiny model with the embedded
defaults (SQLite, in-process queue, worker in the API process)."""

from __future__ import annotations

import json
import time

import pytest

from .service_support import post_edit, running_app, wait_job

FACTS = [
    ("The mother tongue of {} is", "Danielle Darrieux", "English"),
    ("{} plays the position of", "Ricky Rubio", "goalkeeper"),
    ("The capital of {} is", "Atlantis", "Paris"),
]


def _apply(client, fact):
    accepted = post_edit(client, *fact)
    job = wait_job(client, accepted["job_id"])
    assert job["status"] == "applied", job
    return accepted["edit_ids"][0], job["result_version"]


def test_edit_rollback_restart_keep_the_recorded_checksums(tiny_settings):
    settings = tiny_settings()
    with running_app(settings) as client:
        base = client.get("/v1/model").json()
        assert base["version"] == 0 and base["checksum"] == base["base_checksum"]
        checksums = {0: base["checksum"]}
        for fact in FACTS:
            _, version = _apply(client, fact)
            model = client.get("/v1/model").json()
            assert model["version"] == version
            checksums[version] = model["checksum"]
        assert len(set(checksums.values())) == 4  # every edit changed the weights
        recorded = {v["number"]: v["checksum"] for v in client.get("/v1/versions").json()}
        assert recorded == checksums
        assert client.get("/v1/model").json()["edited_layers"] == [1]

        rolled = client.post("/v1/rollback", json={"to_version": 1})
        assert rolled.status_code == 200 and rolled.json()["status"] == "applied"
        model = client.get("/v1/model").json()
        assert model["version"] == 4 and model["checksum"] == checksums[1]
        edits = client.get("/v1/edits").json()
        assert [e["live"] for e in edits["edits"]] == [False, False, True]  # newest first
        head_checksum = model["checksum"]

    with running_app(settings) as client:  # a restart replays the ledger to its head
        ready = client.get("/readyz").json()
        assert ready["version"] == 4 and ready["checksum"] == head_checksum
        rolled = client.post("/v1/rollback", json={"to_version": 3}).json()
        assert client.get("/v1/model").json()["checksum"] == checksums[3]
        assert rolled["result_version"] == 5


def test_subtract_and_rebase_reverts(tiny_settings):
    with running_app(tiny_settings()) as client:
        ids = [_apply(client, fact)[0] for fact in FACTS]
        before = {v["number"]: v["checksum"] for v in client.get("/v1/versions").json()}

        reply = client.post(f"/v1/edits/{ids[2]}/revert", json={"mode": "subtract"})
        assert reply.status_code == 200 and reply.json()["status"] == "applied", reply.json()
        assert not client.get(f"/v1/edits/{ids[2]}").json()["live"]
        # subtracting the last patch lands next to version 2 (fp32 rounding aside)
        assert client.get("/v1/model").json()["version"] == 4

        reply = client.post(f"/v1/edits/{ids[0]}/revert", json={"mode": "rebase"})
        assert reply.status_code == 200 and reply.json()["status"] == "applied", reply.json()
        versions = client.get("/v1/versions").json()
        restart, rebased = versions[1], versions[0]
        assert restart["kind"] == "revert" and restart["parent"] == 0
        assert restart["checksum"] == before[0]
        assert rebased["kind"] == "rebase" and rebased["edit_ids"] == [ids[1]]
        states = {e["id"]: e["live"] for e in client.get("/v1/edits").json()["edits"]}
        assert states == {ids[0]: False, ids[1]: True, ids[2]: False}
        # the history keeps everything: 3 edits, subtract, restart, rebased edit
        assert [v["kind"] for v in versions] == [
            "rebase", "revert", "revert", "edit", "edit", "edit", "base"
        ]  # fmt: skip
        again = client.post(f"/v1/edits/{ids[0]}/revert", json={"mode": "rebase"})
        assert again.status_code == 409 and again.json()["field"] == "edit_id"


def test_batches_generation_and_streams(tiny_settings):
    with running_app(tiny_settings()) as client:
        reply = client.post(
            "/v1/edits",
            json={
                "edits": [{"prompt": p, "subject": s, "target_new": t} for p, s, t in FACTS],
                "method": "memit",
                "hparams": {"steps": 5},
            },
        )
        assert reply.status_code == 202
        accepted = reply.json()
        events = client.get(f"/v1/jobs/{accepted['job_id']}/events").text
        blocks = [b for b in events.split("\n\n") if b.strip()]
        assert blocks[-1].startswith("event: done")
        final = json.loads(blocks[-1].split("data: ", 1)[1])
        assert final["status"] == "applied" and final["percent"] == 100.0
        assert len(accepted["edit_ids"]) == 3
        version = final["result_version"]
        edit = client.get(f"/v1/edits/{accepted['edit_ids'][1]}").json()
        assert edit["method"] == "memit" and edit["diagnostics"]["layers"]
        subtract = client.post(f"/v1/edits/{edit['id']}/revert", json={"mode": "subtract"})
        assert subtract.status_code == 422 and subtract.json()["field"] == "mode"

        body = {"inputs": ["The mother tongue of Danielle Darrieux is", "Hello"],
                "parameters": {"max_new_tokens": 6}}  # fmt: skip
        many = client.post("/v1/generate", json=body)
        assert many.headers["X-Model-Version"] == str(version)
        assert [o["generated_tokens"] for o in many.json()] == [6, 6]
        one = client.post("/v1/generate", json={"inputs": body["inputs"][0],
                                                "parameters": {"max_new_tokens": 6}})  # fmt: skip
        assert one.json()["generated_text"] == many.json()[0]["generated_text"]  # greedy
        sampled = [
            client.post("/v1/generate", json={"inputs": "Hello", "parameters": {
                "max_new_tokens": 8, "do_sample": True, "temperature": 1.5, "seed": s}}).json()
            for s in (1, 1, 2)
        ]  # fmt: skip
        assert sampled[0]["generated_text"] == sampled[1]["generated_text"]  # seeded
        assert sampled[0]["generated_text"] != sampled[2]["generated_text"]

        stream = client.post("/v1/generate_stream", json={**body, "inputs": body["inputs"][0]})
        datas = [
            json.loads(line[6:]) for line in stream.text.splitlines() if line.startswith("data: ")
        ]
        pieces = "".join(d["token"]["text"] for d in datas[:-1])
        assert datas[-1]["generated_text"] == pieces == one.json()["generated_text"]


def _edit_body(method: str = "rome", hparams: dict | None = None, **fields) -> dict:
    edit = {"prompt": "{} is in", "subject": "France", "target_new": "Asia", **fields}
    return {"edit": edit, "method": method, "hparams": hparams or {}}


@pytest.mark.parametrize(
    ("path", "body", "status", "field"),
    [
        ("/v1/edits", _edit_body(prompt="The capital is"), 422, "edit.prompt"),
        ("/v1/edits", _edit_body(target_new="  "), 422, "edit.target_new"),
        ("/v1/edits", _edit_body(method="magic"), 422, "method"),
        ("/v1/edits", _edit_body(hparams={"stepz": 3}), 422, "hparams.stepz"),
        ("/v1/edits", _edit_body(hparams={"layer": 99}), 422, "hparams.layer"),
        ("/v1/edits", _edit_body(hparams={"steps": 10**6}), 422, "hparams.steps"),
        ("/v1/edits", _edit_body(hparams={"prefixes": 500}), 422, "hparams.prefixes"),
        ("/v1/edits", _edit_body(hparams={"prefix_length": 10**4}), 422, "hparams.prefix_length"),
        ("/v1/edits", _edit_body(method="memit", hparams={"iterations": 10**3}), 422,
         "hparams.iterations"),
        ("/v1/edits", _edit_body(method="memit", hparams={"layers": [1] * 100}), 422,
         "hparams.layers"),
        ("/v1/edits", _edit_body(prompt="{} is in " + "very " * 600), 422, "edit.prompt"),
        ("/v1/edits", {"edits": []}, 422, "edits"),
        ("/v1/edits", {"edits": [{"prompt": "{} is", "subject": "A", "target_new": "B"},
                                 {"prompt": "{} is", "subject": "A"}]}, 422, "edits.1.target_new"),
        ("/v1/rollback", {"to_version": 42}, 422, "to_version"),
        ("/v1/rollback", {"to_version": -1}, 422, "to_version"),
        ("/v1/generate", {"inputs": "Hi", "parameters": {"max_new_tokens": 10**6}}, 422,
         "parameters.max_new_tokens"),
        ("/v1/generate", {"inputs": ["Hi", ""]}, 422, "inputs.1"),
        ("/v1/generate", {"inputs": "Hi", "parameters": {"top_p": 2}}, 422, "parameters.top_p"),
        ("/v1/generate", {"inputs": "Hi", "parameters": {"stop": ["x" * 1000]}}, 422,
         "parameters.stop.0"),
        ("/v1/edits", _edit_body(paraphrases=["{} is"] * 1000), 422, "edit.paraphrases"),
        ("/v1/edits/nope/revert", {"mode": "rebase"}, 404, "edit_id"),
        ("/v1/edits/nope/revert", {"mode": "undo"}, 422, "mode"),
    ],
)  # fmt: skip
def test_bad_input_is_a_4xx_naming_the_field_and_changes_nothing(
    tiny_api, path, body, status, field
):
    before = tiny_api.get("/v1/model").json()
    jobs_before = tiny_api.get("/v1/edits").json()["total"]
    reply = tiny_api.post(path, json=body)
    assert reply.status_code == status, reply.json()
    error = reply.json()
    assert error["field"] == field and error["error"] and error["type"]
    assert tiny_api.get("/v1/model").json() == before
    assert tiny_api.get("/v1/edits").json()["total"] == jobs_before


@pytest.mark.parametrize(
    ("method", "hparams", "kind", "field"),
    [
        ("rome", {"stepz": 3}, "unknown_hyperparameter", "stepz"),
        ("rome", {"steps": "many"}, "invalid_value", "steps"),
        ("rome", {"lr": True}, "invalid_value", "lr"),
        ("rome", {"steps": 0}, "invalid_value", "steps"),
        ("rome", {"kl_factor": -1}, "invalid_value", "kl_factor"),
        ("rome", {"steps": 10**6}, "invalid_value", "steps"),
        ("memit", {"layers": [1] * 100}, "invalid_value", "layers"),
        ("rome", {"variant": "fancy"}, "invalid_value", "variant"),
        ("rome", {"layer": 99}, "layer_out_of_range", "layer"),
        ("rome", {"layer": -1}, "layer_out_of_range", "layer"),
        ("memit", {"layers": [2, 4]}, "layer_out_of_range", "layers"),  # the model has 0..3
        ("grace", {"layer": 4}, "layer_out_of_range", "layer"),
        ("ft-l", {"layers": [7]}, "layer_out_of_range", "layers"),
    ],
)
def test_a_bad_hyperparameter_names_what_is_wrong_with_it(tiny_api, method, hparams, kind, field):
    reply = tiny_api.post("/v1/edits", json=_edit_body(method, hparams))
    assert reply.status_code == 422, reply.json()
    assert reply.json()["type"] == kind and reply.json()["field"] == f"hparams.{field}"


def test_unknown_routes_and_bad_json_answer_json_errors(tiny_api):
    missing = tiny_api.get("/v1/nowhere")
    assert missing.status_code == 404 and missing.json()["type"] == "not_found"
    broken = tiny_api.post(
        "/v1/edits", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert broken.status_code == 422 and broken.json()["type"] == "invalid_json"
    assert "line 1, column 2" in broken.json()["error"]
    assert tiny_api.get("/v1/jobs/999").status_code == 404
    assert tiny_api.get("/healthz").json() == {"status": "ok"}
    assert "/v1/edits" in tiny_api.get("/openapi.json").json()["paths"]


@pytest.fixture(scope="module")
def tiny_api(tmp_path_factory, tiny_model_dir, corpus_file):
    from .service_support import service_settings

    folder = tmp_path_factory.mktemp("api")
    settings = service_settings(
        folder,
        tiny_model_dir,
        cache_dir=folder.parent / "editserve-cache",
        stats_corpus=corpus_file,
        stats_samples=2_000,
    )
    with running_app(settings) as client:
        yield client


def test_bfloat16_serving_stays_exact_through_edits_rollback_and_restart(tiny_settings):
    """fp32 master copies: bf16 weights are a pure function of the patch sequence."""
    settings = tiny_settings(dtype="bfloat16")
    with running_app(settings) as client:
        assert client.get("/v1/model").json()["dtype"] == "bfloat16"
        checksums = {}
        for fact in FACTS[:2]:
            _, version = _apply(client, fact)
            checksums[version] = client.get("/v1/model").json()["checksum"]
        assert len(set(checksums.values())) == 2
        client.post("/v1/rollback", json={"to_version": 1})
        assert client.get("/v1/model").json()["checksum"] == checksums[1]
        client.post("/v1/rollback", json={"to_version": 2})
        assert client.get("/v1/model").json()["checksum"] == checksums[2]
    with running_app(settings) as client:
        assert client.get("/readyz").json()["checksum"] == checksums[2]


def test_a_corrupt_patch_blob_is_detected_at_start_up_and_never_applied(tiny_settings):
    from fastapi.testclient import TestClient
    from sqlalchemy import text

    from service.api.app import create_app
    from service.ledger.db import make_engine

    settings = tiny_settings()
    with running_app(settings) as client:
        _apply(client, FACTS[0])
        sha = client.get("/v1/versions").json()[0]["patch_sha256"]
    with make_engine(settings.resolved_database_url).begin() as db:  # blobs live in the ledger
        data = db.execute(text("SELECT data FROM blobs WHERE sha256 = :s"), {"s": sha}).scalar()
        flipped = bytes(data)[:-8] + b"\x00" * 8  # flipped bytes, same size
        db.execute(text("UPDATE blobs SET data = :d WHERE sha256 = :s"), {"d": flipped, "s": sha})
    with TestClient(create_app(settings)) as client:
        for _ in range(600):
            ready = client.get("/readyz")
            if "corrupt" in str(ready.json()["stage"]):
                break
            time.sleep(0.05)
        assert ready.status_code == 503 and sha in ready.json()["stage"]
        refused = client.post("/v1/generate", json={"inputs": "Hi"})
        assert refused.status_code == 503 and refused.json()["type"] == "unavailable"


def test_evaluate_scores_cases_and_edits_against_the_base(tiny_settings):
    """The contract of /v1/evaluate; that an edit moves the scores is shown on SmolLM2."""
    case = {
        "prompt": "The mother tongue of {} is",
        "subject": "Danielle Darrieux",
        "target_new": "English",
        "target_true": "French",
        "paraphrases": ["Danielle Darrieux spoke the language"],
        "locality": [{"prompt": "The capital of France is", "answer": "Paris"}],
        "portability": [{"prompt": "Danielle Darrieux's mother tongue is", "answer": "English"}],
    }
    with running_app(tiny_settings()) as client:
        before = client.post("/v1/evaluate", json={"cases": [case]}).json()
        assert before["model_version"] == 0 and before["cases"] == 1
        assert before["metrics"] == before["baseline"]  # version 0 is the base
        assert before["metrics"]["locality"] == 1.0  # the base agrees with itself
        accepted = client.post("/v1/edits", json={"edit": case})
        assert wait_job(client, accepted.json()["job_id"])["status"] == "applied"
        after = client.post("/v1/evaluate", json={"edit_ids": accepted.json()["edit_ids"]})
        assert after.headers["X-Model-Version"] == "1"
        scores, base = after.json()["metrics"], after.json()["baseline"]
        assert base == before["baseline"]  # the stored request, scored on the base again
        assert set(scores) >= {"reliability", "generalization", "locality", "portability",
                               "efficacy", "paraphrase", "neighborhood"}  # fmt: skip
        assert all(value is not None for value in scores.values())
        both = client.post("/v1/evaluate", json={"cases": [case], "edit_ids": ["x"]})
        assert both.status_code == 422 and both.json()["field"] == "cases"
        unknown = client.post("/v1/evaluate", json={"edit_ids": ["nope"]})
        assert unknown.status_code == 404 and unknown.json()["field"] == "edit_ids.0"
        bad = client.post("/v1/evaluate", json={"cases": [{**case, "prompt": "No subject"}]})
        assert bad.status_code == 422 and bad.json()["field"] == "cases.0.prompt"


def test_a_job_a_crash_interrupted_too_often_fails_instead_of_looping(tiny_settings):
    with running_app(tiny_settings(run_worker=False, max_job_attempts=2)) as client:
        job_id = post_edit(client, *FACTS[0])["job_id"]
        ledger = client.app.state.service.ledger
        ledger.start_job(job_id)  # two runs that a crash cut short
        ledger.start_job(job_id)
    with running_app(tiny_settings(max_job_attempts=2)) as client:
        job = wait_job(client, job_id)
        assert job["status"] == "failed" and "interrupted 2 times" in job["error"], job
        assert client.get("/v1/model").json()["version"] == 0


def test_alphaedit_state_follows_the_ledger_through_a_rollback(tiny_settings):
    """AlphaEdit protects the keys of the edits in effect; after a rollback those are the
    rolled-back-to version's, so the same edit computes the same patch as it did there."""
    with running_app(tiny_settings()) as client:
        first, second = FACTS[0], FACTS[1]
        for fact in (first, second):
            job = wait_job(client, post_edit(client, *fact, method="alphaedit")["job_id"])
            assert job["status"] == "applied", job
        assert client.post("/v1/rollback", json={"to_version": 1}).json()["status"] == "applied"
        job = wait_job(client, post_edit(client, *second, method="alphaedit")["job_id"])
        assert job["status"] == "applied", job
        patches = {v["number"]: v["patch_sha256"] for v in client.get("/v1/versions").json()}
        assert patches[4] == patches[2]  # same weights, same history: the same patch
        # on top of version 4 (history: both edits) the same edit is a different patch
        job = wait_job(client, post_edit(client, *second, method="alphaedit")["job_id"])
        patches = {v["number"]: v["patch_sha256"] for v in client.get("/v1/versions").json()}
        assert patches[5] not in (patches[2], None)


def test_grace_codebook_is_served_rolled_back_and_replayed(tiny_settings):
    """A GRACE edit changes no weight, yet /generate says the target; a rollback takes the
    codebook away and a restart rebuilds it from the ledger, checksums and all."""
    settings = tiny_settings()
    prompt = "The mother tongue of Danielle Darrieux is"

    def say(client) -> str:
        body = {"inputs": prompt, "parameters": {"max_new_tokens": 1}}
        return client.post("/v1/generate", json=body).json()["generated_text"]

    with running_app(settings) as client:
        unedited = say(client)
        accepted = post_edit(client, *FACTS[0], method="grace", hparams={"lr": 0.5})
        job = wait_job(client, accepted["job_id"])
        assert job["status"] == "applied", job
        edit = client.get(f"/v1/edits/{accepted['edit_ids'][0]}").json()
        assert edit["diagnostics"]["extra"]["entries"] >= 1
        model = client.get("/v1/model").json()
        assert model["checksum"] != model["base_checksum"]  # the codebook is in the sum
        assert model["edited_parameters"] == []  # no weight changed
        edited_checksum, edited = model["checksum"], say(client)
        assert edited.strip() == "English" and edited != unedited
        subtract = client.post(f"/v1/edits/{edit['id']}/revert", json={"mode": "subtract"})
        assert subtract.status_code == 422 and subtract.json()["field"] == "mode"

    with running_app(settings) as client:  # replayed: the same codebook, the same answer
        assert client.get("/v1/model").json()["checksum"] == edited_checksum
        assert say(client) == edited
        rolled = client.post("/v1/rollback", json={"to_version": 0}).json()
        assert rolled["status"] == "applied"
        model = client.get("/v1/model").json()
        assert model["checksum"] == model["base_checksum"]
        assert say(client) == unedited
        rebased = client.post("/v1/rollback", json={"to_version": 1}).json()
        assert rebased["status"] == "applied" and say(client) == edited


@pytest.mark.parametrize(
    ("path", "raw", "field"),
    [
        ("/v1/generate", b'{"inputs": "The capital of \\ud800 France is"}', "inputs"),
        ("/v1/generate_stream", b'{"inputs": "Hi \\udfff"}', "inputs"),
        ("/v1/generate", b'{"inputs": ["Hi", "\\ud83d"]}', "inputs.1"),
        (
            "/v1/edits",
            b'{"edit": {"prompt": "{} is", "subject": "A\\ud800", "target_new": "x"}}',
            "edit.subject",
        ),
        ("/v1/evaluate", b'{"cases": [{"prompt": "\\udc00{}"}]}', "cases.0.prompt"),
    ],
)
def test_invalid_unicode_is_a_422_naming_the_field_and_changes_nothing(tiny_api, path, raw, field):
    before = tiny_api.get("/v1/model").json()
    reply = tiny_api.post(path, content=raw, headers={"content-type": "application/json"})
    assert reply.status_code == 422, reply.text
    assert reply.json()["field"] == field and reply.json()["type"] == "invalid_unicode"
    assert reply.headers["X-Request-ID"]
    assert tiny_api.get("/v1/model").json() == before


def test_bytes_that_are_not_utf8_and_chunked_bodies_over_the_limit_are_refused(tiny_api):
    latin = tiny_api.post(
        "/v1/generate",
        content=b'{"inputs": "caf\xe9"}',
        headers={"content-type": "application/json"},
    )
    assert latin.status_code == 422 and latin.json()["type"] == "invalid_unicode"
    chunks = (b'{"inputs": "' + b"x" * 100_000 for _ in range(12))  # 1.2 MB, no length
    chunked = tiny_api.post("/v1/generate", content=chunks)
    assert chunked.status_code == 413 and chunked.json()["type"] == "body_too_large"
    assert tiny_api.get("/healthz").status_code == 200


def test_an_unexpected_error_is_a_json_500_that_keeps_its_request_id(tiny_settings):
    from fastapi.testclient import TestClient

    from service.api.app import create_app

    app = create_app(tiny_settings())

    def broken() -> None:
        raise RuntimeError("a bug")

    app.add_api_route("/v1/broken", broken)
    with TestClient(app, raise_server_exceptions=False) as client:
        reply = client.get("/v1/broken", headers={"X-Request-ID": "trace-500"})
        assert reply.status_code == 500 and reply.json()["type"] == "internal"
        assert reply.headers["X-Request-ID"] == "trace-500"
        assert "a bug" not in reply.text  # no traceback or message leaks
