"""Property-based fuzzing of the whole HTTP API from its OpenAPI schema (schemathesis
strategies driven by hypothesis): no request gets a 500, and a rejected one changes nothing."""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from service.api.openai_errors import OPENAI_PATHS

from .service_support import running_app, service_settings


@pytest.fixture(scope="module")
def fuzz_client(tmp_path_factory, tiny_model_dir, corpus_file):
    folder = tmp_path_factory.mktemp("fuzz")
    config = service_settings(
        folder,
        tiny_model_dir,
        cache_dir=folder.parent / "editserve-cache",
        stats_corpus=corpus_file,
        stats_samples=2_000,
        run_worker=False,  # accepted jobs stay queued: the fuzzer never waits on edits
        max_new_tokens=8,
        job_wait_seconds=0.2,
        max_queue_depth=50,
    )
    with running_app(config) as client:
        yield client


def _state(client) -> tuple:
    model = client.get("/v1/model").json()
    return model["version"], model["checksum"], client.get("/v1/edits").json()["total"]


def _send(client, case):
    kwargs = case.as_transport_kwargs(base_url="http://testserver")
    return client.request(
        kwargs["method"],
        kwargs["url"],
        params=kwargs.get("params"),
        headers=kwargs.get("headers"),
        json=kwargs.get("json"),
        content=kwargs.get("data"),
    )


def test_no_request_crashes_the_server_or_half_changes_it(fuzz_client):
    schema = schemathesis.openapi.from_dict(fuzz_client.get("/openapi.json").json())
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/v1/edits", "/v1/generate", "/v1/rollback"}
    seen: set[str] = set()

    @given(data=st.data())
    @settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
    def check(data):
        case = data.draw(data.draw(st.sampled_from(operations)).as_strategy())
        seen.add(f"{case.method} {case.path}")
        before = _state(fuzz_client)
        response = _send(fuzz_client, case)
        where = f"{case.method} {case.formatted_path}"
        assert response.status_code < 500, (where, response.text)
        if 400 <= response.status_code < 500:
            body = response.json()
            if case.path.startswith(OPENAI_PATHS):  # OpenAI's error shape on its routes
                assert body["error"]["message"] and body["error"]["type"], response.text
            else:
                assert body["error"] and body["type"], response.text
            assert _state(fuzz_client) == before, f"rejected {where} changed state"

    check()
    assert len(seen) >= 10  # most operations were exercised
