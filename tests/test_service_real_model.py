"""The product's promise on a real pretrained model (SmolLM2), PostgreSQL and Redis:
edits show in /generate, rollback and restart are exact, a rebase revert undoes one edit."""

from __future__ import annotations

import pytest

from .conftest import CACHE, REAL_MODEL_STATS_SAMPLES
from .service_support import (
    postgres_database,
    require_shared_redis,
    running_app,
    service_settings,
    wait_job,
)

pytestmark = pytest.mark.slow

FACTS = [
    ("The mother tongue of {} is", "Danielle Darrieux", "English", "French"),
    ("The Eiffel Tower is located in the city of", "Eiffel Tower", "Rome", "Paris"),
    ("The capital of {} is", "Canada", "Sydney", "Ottawa"),
]
PROMPTS = [prompt.replace("{}", subject) for prompt, subject, _, _ in FACTS]


def _answers(client) -> list[str]:
    reply = client.post(
        "/v1/generate", json={"inputs": PROMPTS, "parameters": {"max_new_tokens": 6}}
    )
    assert reply.status_code == 200, reply.json()
    return [out["generated_text"] for out in reply.json()]


def test_edits_generate_rollback_restart_and_rebase_on_smollm2(tmp_path):
    with postgres_database() as database_url:
        settings = service_settings(
            tmp_path,
            "smollm2-135m-instruct",
            database_url=database_url,
            redis_url=require_shared_redis(),
            cache_dir=CACHE,
            stats_samples=REAL_MODEL_STATS_SAMPLES,
            guard=True,
        )
        with running_app(settings) as client:
            before = _answers(client)
            for answer, (_, _, _, truth) in zip(before, FACTS, strict=True):
                assert truth in answer

            edit_ids, checksums, answers = [], {}, {}
            for prompt, subject, target, truth in FACTS:
                edit = {"prompt": prompt, "subject": subject, "target_new": target,
                        "target_true": truth}  # fmt: skip
                accepted = client.post("/v1/edits", json={"edit": edit}).json()
                job = wait_job(client, accepted["job_id"])
                assert job["status"] == "applied", job
                edit_ids.append(accepted["edit_ids"][0])
                checksums[job["result_version"]] = client.get("/v1/model").json()["checksum"]
                answers[job["result_version"]] = _answers(client)
            edited = answers[3]
            for answer, (_, _, target, _) in zip(edited, FACTS, strict=True):
                assert target in answer  # all three edits show in /generate

            scored = client.post("/v1/evaluate", json={"edit_ids": edit_ids}).json()
            assert scored["metrics"]["reliability"] == 1.0 and scored["metrics"]["efficacy"] == 1.0
            assert scored["baseline"]["efficacy"] == 0.0  # the base prefers the true answers

            # revert the oldest edit by rebase: the others hold, its old fact is back
            reverted = client.post(f"/v1/edits/{edit_ids[0]}/revert", json={"mode": "rebase"})
            assert reverted.json()["status"] == "applied", reverted.json()
            rebased = _answers(client)
            assert FACTS[0][3] in rebased[0] and FACTS[0][2] not in rebased[0]
            assert FACTS[1][2] in rebased[1] and FACTS[2][2] in rebased[2]

            rolled = client.post("/v1/rollback", json={"to_version": 1})
            assert rolled.json()["status"] == "applied", rolled.json()
            model = client.get("/v1/model").json()
            assert model["checksum"] == checksums[1]
            assert _answers(client) == answers[1]  # it answers as it did at version 1
            head = model["version"], model["checksum"]

        with running_app(settings) as client:  # restart: back at the head, same weights
            ready = client.get("/readyz").json()
            assert (ready["version"], ready["checksum"]) == head
            assert _answers(client) == answers[1]


def test_the_edit_guard_refuses_damaging_edits_on_smollm2(tmp_path):
    """A normal edit passes the guard (its figures and cost land in the diagnostics); a
    planted huge-norm edit and a ROME edit whose subject is the first token are refused
    with their figures, and the model stays at its previous version."""
    settings = service_settings(
        tmp_path,
        "smollm2-135m-instruct",
        cache_dir=CACHE,
        stats_samples=REAL_MODEL_STATS_SAMPLES,
        guard=True,
    )
    with running_app(settings) as client:
        normal = {
            "prompt": "The mother tongue of {} is",
            "subject": "Danielle Darrieux",
            "target_new": "English",
        }
        base = client.get("/v1/model").json()
        first_token = {
            **normal,
            "subject": "The",
            "prompt": "{} mother tongue of Danielle Darrieux is",
        }
        huge = {"clamp_norm_factor": 100.0, "lr": 20.0, "stop_nll": 0.0001, "steps": 60}
        for body in ({"edit": first_token}, {"edit": normal, "hparams": huge}):
            job = wait_job(client, client.post("/v1/edits", json=body).json()["job_id"])
            assert job["status"] == "rejected", job
            assert job["error"].startswith("refused by the edit guard"), job["error"]
            report = job["result"]["guard"]
            assert not report["passed"] and report["reasons"]
            assert report["figures"]["delta_ratio"] > 0.5  # both write far too much
            model = client.get("/v1/model").json()
            assert model["version"] == 0 and model["checksum"] == base["checksum"]

        job = wait_job(client, client.post("/v1/edits", json={"edit": normal}).json()["job_id"])
        assert job["status"] == "applied", job
        edit = client.get(f"/v1/edits/{job['edit_ids'][0]}").json()
        guard = edit["diagnostics"]["guard"]
        assert guard["passed"] and guard["seconds"] > 0 and not guard["reasons"]
        assert guard["figures"]["delta_ratio"] < 0.5


@pytest.mark.parametrize(
    "methods", [("grace", "rome", "ft-m"), ("rome", "ft-m", "grace")], ids=["grace-first", "last"]
)
def test_grace_rome_and_ft_m_compose_in_either_order_on_smollm2(tmp_path, methods):
    """GRACE keeps its codebook in a late layer; ROME and FT-M write weights below it. Each
    fact is said after every later edit, whatever the order."""
    settings = service_settings(
        tmp_path, "smollm2-135m-instruct", cache_dir=CACHE, stats_samples=REAL_MODEL_STATS_SAMPLES
    )
    with running_app(settings) as client:
        layers = client.get("/v1/model").json()["layers"]
        for done, method in enumerate(methods):
            prompt, subject, target, _ = FACTS[done]
            edit = {"prompt": prompt, "subject": subject, "target_new": target}
            accepted = client.post("/v1/edits", json={"edit": edit, "method": method}).json()
            job = wait_job(client, accepted["job_id"])
            assert job["status"] == "applied", job
            answers = _answers(client)
            for index in range(done + 1):
                assert FACTS[index][2] in answers[index], (methods[index], "after", method)
        edits = client.get("/v1/edits").json()["edits"]
        assert all(e["live"] for e in edits)
        layer_of = {e["method"]: e["diagnostics"]["layers"] for e in edits}
        assert max(layer_of["rome"] + layer_of["ft-m"]) < min(layer_of["grace"]) < layers
