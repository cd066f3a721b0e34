"""The serving path never waits for an edit, never serves a torn version, and a cancelled
edit applies nothing. Real HTTP through the app's lifespan, on the tiny GPT-2."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx

from .service_support import ServiceProcess, running_app, wait_job

# an edit that computes for a while: the most optimisation steps a request may ask for
LONG = {"steps": 1000, "prefixes": 0, "lr": 1e-4, "kl_factor": 0.0}
FACT = {"prompt": "The capital of {} is", "subject": "Atlantis", "target_new": "Rome"}


def _post_edit(client, hparams=None, fact=FACT, method="rome") -> int:
    reply = client.post(
        "/v1/edits", json={"edit": fact, "method": method, "hparams": hparams or LONG}
    )
    assert reply.status_code == 202, reply.json()
    return reply.json()["job_id"]


def _wait_running(client, job_id: int, timeout: float = 300.0) -> dict:
    """Until the job is computing its optimisation (past statistics and prefixes)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(f"/v1/jobs/{job_id}").json()
        if job["status"] == "running" and "optimise" in job["stage"]:
            return job
        assert job["status"] in ("queued", "running"), job
        time.sleep(0.02)
    raise AssertionError(f"job {job_id} never started computing")


def _generate(client, prompt: str, tokens: int = 4) -> dict:
    reply = client.post(
        "/v1/generate", json={"inputs": prompt, "parameters": {"max_new_tokens": tokens}}
    )
    assert reply.status_code == 200, reply.json()
    return reply.json()


def test_generation_is_answered_while_an_edit_computes_and_a_cancelled_edit_applies_nothing(
    tiny_settings,
):
    with running_app(tiny_settings(guard=False)) as client:
        before = client.get("/v1/model").json()
        job_id = _post_edit(client)
        queued_id = _post_edit(client)  # waits behind the first
        _wait_running(client, job_id)
        for prompt in ("The capital of Atlantis is", "Hello", "One, two,"):
            answer = _generate(client, prompt)
            assert answer["model_version"] == before["version"]
        # the edit was still computing when every answer came back
        assert client.get(f"/v1/jobs/{job_id}").json()["status"] == "running"

        # cancel the queued one, then the running one: neither applies
        queued = client.post(f"/v1/jobs/{queued_id}/cancel")
        assert queued.status_code == 202 and queued.json()["status"] == "cancelled"
        assert client.post(f"/v1/jobs/{job_id}/cancel").status_code == 202
        running = wait_job(client, job_id)
        assert running["status"] == "cancelled", running
        assert running["result_version"] is None
        for edit_id in running["edit_ids"] + queued.json()["edit_ids"]:
            assert client.get(f"/v1/edits/{edit_id}").json()["status"] == "cancelled"
        after = client.get("/v1/model").json()
        assert (after["version"], after["checksum"]) == (before["version"], before["checksum"])
        assert client.get("/v1/versions").json()[0]["number"] == before["version"]

        # a job that has ended cannot be cancelled; the service goes on editing
        done = wait_job(client, _post_edit(client, {"steps": 5, "prefixes": 0}))
        assert done["status"] == "applied", done
        refused = client.post(f"/v1/jobs/{done['id']}/cancel")
        assert refused.status_code == 409 and refused.json()["field"] == "job_id"
        assert client.post("/v1/jobs/999999/cancel").status_code == 404


def test_a_job_past_its_time_limit_is_stopped_and_records_nothing(tiny_settings):
    with running_app(tiny_settings(guard=False, job_time_limit_seconds=0.5)) as client:
        before = client.get("/v1/model").json()["version"]
        job = wait_job(client, _post_edit(client))
        assert (job["status"], job["error_type"]) == ("failed", "TimeLimit"), job
        assert client.get("/v1/model").json()["version"] == before


def test_answers_racing_edits_each_match_their_versions_greedy_answer(tiny_settings):
    """100 generations race 20 edits: every answer is the greedy answer of the version it
    names (no answer mixes two versions' weights)."""
    prompts = ["The capital of Atlantis is", "Alice Smith works as a", "My favourite colour is"]
    subjects = ["Atlantis", "Alice Smith", "colour"]
    with running_app(tiny_settings(guard=False)) as client:
        answers: list[tuple[str, int, str]] = []
        done = threading.Event()

        def edits() -> None:
            for i in range(20):
                fact = {
                    "prompt": prompts[i % 3].replace(subjects[i % 3], "{}"),
                    "subject": subjects[i % 3],
                    "target_new": f" word{i}",
                }
                hparams = {"steps": 20, "prefixes": 0, "clamp_norm_factor": 8.0}
                wait_job(client, _post_edit(client, hparams, fact))
            done.set()

        def generate(index: int) -> None:
            prompt = prompts[index % 3]
            answer = _generate(client, prompt, tokens=6)
            answers.append((prompt, answer["model_version"], answer["generated_text"]))

        editor = threading.Thread(target=edits)
        editor.start()
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(generate, range(100)))
        editor.join()
        assert done.is_set()
        versions = {version for _, version, _ in answers}
        assert len(versions) > 1, "the answers should span several versions"

        greedy: dict[tuple[str, int], str] = {}
        for version in sorted(versions):
            job = client.post("/v1/rollback", json={"to_version": version}).json()
            assert wait_job(client, job["id"])["status"] == "applied"
            for prompt in prompts:
                greedy[prompt, version] = _generate(client, prompt, tokens=6)["generated_text"]
        assert len({text for text in greedy.values()}) > len(prompts)  # edits changed answers
        for prompt, version, text in answers:
            assert text == greedy[prompt, version], (prompt, version)


def _decoded(url: str) -> float:
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith("editserve_decoded_tokens_total "):
            return float(line.split()[1])
    raise AssertionError("no editserve_decoded_tokens_total in /metrics")


def test_a_stream_its_client_closes_stops_generating(tiny_settings, tmp_path):
    """A real server process: the client reads two pieces of a 400-token stream and hangs
    up; the server stops decoding for it within a few steps."""
    server = ServiceProcess(tiny_settings(), "serve", tmp_path / "serve.log").start()
    try:
        deadline = time.monotonic() + 300
        while not server.ready():
            assert time.monotonic() < deadline, "the server did not become ready"
            time.sleep(0.2)
        before = _decoded(server.url)
        body = {"inputs": "Once upon a time", "parameters": {"max_new_tokens": 400}}
        with (
            httpx.Client(base_url=server.url, timeout=60) as client,
            client.stream("POST", "/v1/generate_stream", json=body) as stream,
        ):
            lines = stream.iter_lines()
            pieces = 0
            while pieces < 2:
                pieces += next(lines).startswith("data:")
        # the connection is closed: the count stops moving well short of 400 tokens
        last, still = -1.0, 0
        while still < 5:
            now = _decoded(server.url)
            still = still + 1 if now == last else 0
            last = now
            time.sleep(0.1)
        assert last - before < 40, f"{last - before} tokens decoded after a 2-piece stream"
        full = httpx.post(f"{server.url}/v1/generate", json=body, timeout=120).json()
        assert full["generated_tokens"] > 40  # the same request, not closed, runs long
    finally:
        server.stop()
