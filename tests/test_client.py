"""The Python client (`service.client`) over real HTTP against one real `editserve serve`
process on the tiny model, in keys mode with the admin key its first start writes. One
server for every part (a start costs most of the test's time on a small CPU)."""

from __future__ import annotations

import pytest

from service.auth import ADMIN_KEY_FILE
from service.client import API_KEY_ENV, EditServeClient, EditServeError, JobTimeoutError

from .service_support import ServiceProcess, wait_all_ready

FACTS = [
    ("The mother tongue of {} is", "Danielle Darrieux", "English"),
    ("{} plays the position of", "Ricky Rubio", "goalkeeper"),
]
PROMPT = "The mother tongue of Danielle Darrieux is"
FAST = {"steps": 5}  # the tiny random model gains nothing from a long optimisation


def test_the_client_against_a_real_server(tiny_settings, tmp_path, monkeypatch):
    settings = tiny_settings(auth="keys")
    process = ServiceProcess(settings, "serve", tmp_path / "serve.log").start()
    try:
        wait_all_ready([process])
        key = (settings.data_dir / ADMIN_KEY_FILE).read_text().strip()
        with EditServeClient(process.url, api_key=key) as client:
            _edit_generate_rollback_revert(client)
            _errors_name_the_field(client)
            _evaluation_run(client)
        _keys(process.url, key, monkeypatch)
    finally:
        process.stop()


def _edit_generate_rollback_revert(client: EditServeClient) -> None:
    assert client.model().version == 0
    progress: list[tuple[float, str]] = []
    job = client.edit_and_wait(
        *FACTS[0],
        hparams=FAST,
        paraphrases=["Danielle Darrieux speaks"],
        locality=[("The capital of France is", "Paris")],
        on_progress=lambda percent, stage: progress.append((percent, stage)),
    )
    assert job.status == "applied" and job.result_version == 1, job
    assert progress and progress[-1] == (100.0, "done")
    assert [p for p, _ in progress] == sorted(p for p, _ in progress)
    first = job.edit_ids[0]
    stored = client.get_edit(first)
    assert stored.live and stored.request["paraphrases"] == ["Danielle Darrieux speaks"]
    assert stored.request["locality"] == [["The capital of France is", "Paris"]]  # as recorded
    answer = client.generate(PROMPT, max_new_tokens=4)
    assert answer.model_version == 1 and answer.generated_tokens == 4

    accepted = client.edit(*FACTS[1], method="rome", hparams=FAST)
    second = accepted.edit_ids[0]
    assert client.wait(accepted.job_id).result_version == 2
    many = client.generate([PROMPT, "Hello"], max_new_tokens=3)
    assert [o.model_version for o in many] == [2, 2]
    earlier = client.generate(PROMPT, max_new_tokens=4, version=1)
    assert earlier == answer  # version 1 answers as it did when it was served
    assert [e.id for e in client.edits().edits] == [second, first]  # newest first

    scored = client.evaluate(edit_ids=[first, second])
    assert scored.model_version == 2 and scored.cases == 2
    assert scored.baseline is not None and "reliability" in scored.metrics

    rolled = client.rollback(1)
    assert (rolled.kind, rolled.status, rolled.result_version) == ("rollback", "applied", 3)
    assert client.model().checksum == client.versions()[-2].checksum  # version 1's
    assert not client.get_edit(second).live

    reverted = client.revert(first, mode="subtract")
    assert reverted.status == "applied", reverted
    assert [v.kind for v in client.versions()][:2] == ["revert", "rollback"]
    model = client.model()
    assert model.version == 4 and model.live_edits == 0
    assert client.generate(PROMPT, max_new_tokens=1).model_version == 4
    with pytest.raises(EditServeError) as again:  # no longer in effect
        client.revert(first)
    assert (again.value.status_code, again.value.field) == (409, "edit_id")
    with pytest.raises(EditServeError) as ended:
        client.cancel(job.id)
    assert (ended.value.status_code, ended.value.type) == (409, "conflict")


def _errors_name_the_field(client: EditServeClient) -> None:
    with pytest.raises(EditServeError) as bad:
        client.edit("The capital is", "France", "Asia")  # no subject in the prompt
    assert (bad.value.status_code, bad.value.field) == (422, "edit.prompt")
    with pytest.raises(EditServeError) as bad:
        client.edit(*FACTS[0], hparams={"stepz": 3})
    assert bad.value.type == "unknown_hyperparameter" and bad.value.field == "hparams.stepz"
    with pytest.raises(EditServeError) as bad:
        client.edit(FACTS[0][0], FACTS[0][1], "")  # the schema's own check, 422 as well
    assert (bad.value.status_code, bad.value.type) == (422, "validation_error")
    assert bad.value.field == "edit.target_new"
    with pytest.raises(EditServeError) as bad:
        client.rollback(99)
    assert bad.value.field == "to_version" and bad.value.request_id
    with pytest.raises(EditServeError) as missing:
        client.job(12345)
    assert (missing.value.status_code, missing.value.type) == (404, "not_found")
    rome = next(m for m in client.methods() if m.name == "rome")
    assert "steps" in {h.name for h in rome.hyperparameters}


def _evaluation_run(client: EditServeClient) -> None:
    case = dict(zip(("prompt", "subject", "target_new"), FACTS[0], strict=True))
    run = client.start_evaluation(cases=[case], protocol="single", hparams=FAST, fluency=False)
    assert run.status == "queued" and run.cases == 1
    with pytest.raises(JobTimeoutError) as early:  # a run copies the model: never this fast
        client.wait_evaluation(run.id, timeout=0)
    assert early.value.last.id == run.id and early.value.last.status in ("queued", "running")
    stages: list[str] = []
    done = client.wait_evaluation(
        run.id, poll_interval=0.2, on_progress=lambda _, stage: stages.append(stage)
    )
    assert done.status == "completed" and stages, done
    assert {row["kind"] for row in client.evaluation_results(run.id)} >= {"baseline", "final"}
    assert [row["kind"] for row in client.evaluation_results(run.id, kind="final")] == ["final"]
    assert [e.id for e in client.evaluations()] == [run.id]


def _keys(url: str, key: str, monkeypatch: pytest.MonkeyPatch) -> None:
    with EditServeClient(url, api_key=key + "x") as wrong, pytest.raises(EditServeError) as denied:
        wrong.model()
    assert (denied.value.status_code, denied.value.type) == (401, "unauthorized")
    monkeypatch.delenv(API_KEY_ENV, raising=False)
    with EditServeClient(url) as anonymous, pytest.raises(EditServeError) as denied:
        anonymous.generate("Hello")
    assert denied.value.status_code == 401
    monkeypatch.setenv(API_KEY_ENV, key)
    with EditServeClient(url) as from_env:
        assert from_env.generate("Hello", max_new_tokens=2).generated_tokens == 2
