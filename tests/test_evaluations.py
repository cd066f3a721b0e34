"""Evaluation jobs through the HTTP API (real lifespan, worker, ledger database): protocols,
results as JSON, CSV and HTML, bad input, cancellation and interruption."""

from __future__ import annotations

import csv
import io
import json
import time

import pytest

from service.ledger.db import make_engine, migrate, session_factory
from service.ledger.schema import JobKind
from service.ledger.store import Ledger

from .conftest import shared
from .service_support import postgres_database, running_app, wait_job


def wait_evaluation(client, job_id: int) -> dict:
    """An evaluation is a job: wait for it as for any, then read its evaluation view."""
    wait_job(client, job_id)
    return client.get(f"/v1/evaluations/{job_id}").json()


def test_sequential_evaluation_job_on_postgres(tiny_settings):
    with postgres_database() as url, running_app(tiny_settings(database_url=url)) as client:
        model_before = client.get("/v1/model").json()
        body = {
            "dataset": "counterfact",
            "split": "train",
            "count": 6,
            "method": "rome",
            "protocol": "sequential",
            "batch_size": 2,
            "checkpoint_every": 2,
        }
        accepted = client.post("/v1/evaluations", json=body)
        assert accepted.status_code == 202, accepted.text
        job_id = accepted.json()["id"]
        assert accepted.json()["cases"] == 6
        # serving goes on while the run edits its own copy of the model
        generated = client.post(
            "/v1/generate", json={"inputs": "Paris is", "parameters": {"max_new_tokens": 3}}
        )
        assert generated.status_code == 200, generated.text
        done = wait_evaluation(client, job_id)
        assert done["status"] == "completed", done
        summary = done["summary"]
        assert summary["edits_done"] == 6 and summary["completed"]
        assert [c["edits_done"] for c in summary["checkpoints"]] == [2, 4]
        names = {"efficacy", "paraphrase", "neighborhood", "reliability", "locality"}
        assert names <= set(summary["final"]) and names <= set(summary["final_baseline"])
        assert {"perplexity", "fluency"} <= set(summary["final"])

        rows = client.get(f"/v1/evaluations/{job_id}/results").json()
        kinds = [r["kind"] for r in rows]
        assert kinds.count("baseline") == 1 and kinds.count("final") == 1
        assert kinds.count("checkpoint") == 2 and kinds.count("case") == 6
        for row in rows:
            if row["kind"] != "baseline":
                assert set(row["metrics"]) >= names and set(row["baseline"]) >= names
        finals = client.get(f"/v1/evaluations/{job_id}/results", params={"kind": "final"}).json()
        assert finals == [r for r in rows if r["kind"] == "final"]

        table = list(
            csv.DictReader(io.StringIO(client.get(f"/v1/evaluations/{job_id}/results.csv").text))
        )
        assert len(table) == len(rows)
        assert {"efficacy", "baseline_efficacy", "edits_done", "case_id"} <= set(table[0])
        assert float(table[-1]["efficacy"]) == pytest.approx(summary["final"]["efficacy"], abs=1e-5)

        report = client.get(f"/v1/evaluations/{job_id}/report")
        assert report.headers["content-type"].startswith("text/html")
        assert "<svg" in report.text and "Checkpoints" in report.text and "rome" in report.text
        assert "did not complete" not in report.text
        cases = [r for r in rows if r["kind"] == "case"]
        for case in cases:  # each case's own words, before and after its edit
            answers = case["answers"]
            assert set(answers) == {"subject", "prompt", "target_new", "before", "after"}
            assert answers["subject"] in answers["prompt"] and answers["target_new"]
        assert "answer before" in report.text
        csv_cases = [line for line in table if line["kind"] == "case"]
        assert [line["answer_after"] for line in csv_cases] == [
            c["answers"]["after"] for c in cases
        ]

        listed = client.get("/v1/evaluations").json()
        assert [e["id"] for e in listed] == [job_id]
        # the served model never moved
        assert client.get("/v1/model").json()["checksum"] == model_before["checksum"]
        assert client.get("/v1/model").json()["version"] == model_before["version"]


def test_single_protocol_on_uploaded_mquake_records(tiny_settings):
    records = json.loads(shared("mquake/mquake-cf-hard.json").read_text())[:2]
    with running_app(tiny_settings()) as client:
        accepted = client.post(
            "/v1/evaluations",
            json={"records": records, "protocol": "single", "fluency": False},
        )
        assert accepted.status_code == 202, accepted.text
        done = wait_evaluation(client, accepted.json()["id"])
        assert done["status"] == "completed", done
        cases = client.get(f"/v1/evaluations/{done['id']}/results", params={"kind": "case"}).json()
        assert [c["case_id"] for c in cases] == [str(r["case_id"]) for r in records]
        for case in cases:
            assert case["metrics"]["multi_hop"] in (0.0, 1.0)
            assert case["baseline"]["multi_hop_original"] in (0.0, 1.0)
        assert "fluency" not in done["summary"]["final"]


BAD = [
    ({"dataset": "squad"}, "dataset", "unknown dataset 'squad'"),
    ({"dataset": "counterfact", "split": "nope"}, "split", "no split 'nope'"),
    ({"dataset": "counterfact", "start": 50_000}, "start", "no cases"),
    ({"dataset": "counterfact", "count": 20_000}, "count", "at most"),
    ({}, "dataset", "exactly one of"),
    ({"dataset": "counterfact", "cases": []}, "dataset", "exactly one of"),
    ({"dataset": "counterfact", "method": "telepathy"}, "method", "unknown method"),
    ({"dataset": "counterfact", "hparams": {"warp": 9}}, "hparams.warp", "warp"),
    ({"dataset": "counterfact", "protocol": "random"}, "protocol", None),
    (
        {
            "records": [
                {"prompt": "{} is in", "subject": "Rome", "target_new": "Asia"},
                {"prompt": "{} is in", "target_new": "Asia"},
            ]
        },
        "records.1.subject",
        "record 1: missing field 'subject'",
    ),
    ({"records": [{"question": "who?"}]}, "records", "record 0 is in none of the formats"),
    (
        {
            "records": [{"prompt": "Rome is in", "subject": "Paris", "target_new": "Asia"}],
            "format": "knowedit",
        },
        "records.0.prompt",
        "contains neither",
    ),
    (
        {"cases": [{"prompt": "Rome is in", "subject": "Paris", "target_new": "Asia"}]},
        "cases.0.prompt",
        None,
    ),
]


def test_bad_evaluations_are_refused_naming_the_field(tiny_settings):
    with running_app(tiny_settings()) as client:
        for body, field, words in BAD:
            reply = client.post("/v1/evaluations", json=body)
            assert reply.status_code == 422, (body, reply.text)
            error = reply.json()
            assert error["field"] == field, (body, error)
            if words:
                assert words in error["error"], (body, error)
        assert client.get("/v1/evaluations").json() == []  # nothing was accepted
        assert client.get("/v1/evaluations/1").status_code == 404


def test_a_cancelled_evaluation_keeps_its_results_and_says_where_it_stopped(tiny_settings):
    with running_app(tiny_settings()) as client:
        body = {"dataset": "counterfact", "split": "train", "count": 60, "protocol": "single"}
        job_id = client.post("/v1/evaluations", json=body).json()["id"]
        deadline = time.monotonic() + 300
        while (
            len(client.get(f"/v1/evaluations/{job_id}/results", params={"kind": "case"}).json()) < 2
        ):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert client.post(f"/v1/evaluations/{job_id}/cancel").status_code == 202
        done = wait_evaluation(client, job_id)
        assert done["status"] == "cancelled", done
        summary = done["summary"]
        assert not summary["completed"] and 2 <= summary["edits_done"] < 60
        assert f"after {summary['edits_done']} of 60 cases" in summary["stopped_at"]
        cases = client.get(f"/v1/evaluations/{job_id}/results", params={"kind": "case"}).json()
        assert len(cases) == summary["edits_done"]
        assert "did not complete" in client.get(f"/v1/evaluations/{job_id}/report").text
        again = client.post(f"/v1/evaluations/{job_id}/cancel")
        assert again.json()["status"] == "cancelled"  # cancelling an ended run changes nothing


def test_an_interrupted_evaluation_is_failed_with_its_rows_kept(tiny_settings):
    settings = tiny_settings()
    url = settings.resolved_database_url
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    migrate(url)
    db = make_engine(url)
    ledger = Ledger(session_factory(db), settings.model)
    plan = {"method": "rome", "protocol": "sequential"}
    source = {"dataset": "counterfact", "split": "train", "count": 4, "start": 0}
    job = ledger.accept_job(JobKind.evaluate, {"source": source, "plan": plan, "cases": 4})
    ledger.start_job(job.id)  # a process began it, wrote two rows, and died
    ledger.add_evaluation_result(
        job.id, {"kind": "baseline", "edits_done": 0, "metrics": {"efficacy": 0.25}}
    )
    ledger.add_evaluation_result(
        job.id,
        {
            "kind": "checkpoint",
            "edits_done": 2,
            "metrics": {"efficacy": 1.0},
            "baseline": {"efficacy": 0.5},
        },
    )
    db.dispose()
    with running_app(settings) as client:
        done = wait_evaluation(client, job.id)
        assert done["status"] == "failed"
        assert "interrupted after 2 edited cases" in done["error"]
        assert done["summary"]["checkpoints"][0]["metrics"] == {"efficacy": 1.0}
        assert len(client.get(f"/v1/evaluations/{job.id}/results").json()) == 2
