"""The OpenAI-compatible routes (/v1/models, /v1/completions, /v1/chat/completions), read
through the official `openai` client over real HTTP through the app's lifespan, on the tiny
random GPT-2 (and the trained fact model for an edit); and the serving loop's logprobs,
checked against the model's own logits. Nothing is timed."""

from __future__ import annotations

import asyncio
import math
import time

import httpx
import openai
import pytest
import torch

from editors.models import load_model
from service.engine.generation import GenerationRequest, SamplingParams
from service.engine.scheduler import ServingLoop

from .service_support import ServiceProcess, running_app, wait_job

PROMPT = "The capital of Atlantis is"
HANG = 120.0  # seconds: only a guard against a hung loop


def _client(http: httpx.Client, key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(
        base_url="http://testserver/v1", api_key=key, http_client=http, max_retries=0
    )


def _prompt_logprobs(model, ids: list[int]) -> list[float]:
    """log P(ids[i] | ids[:i]) for i >= 1, straight from the model."""
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, :-1].float()
    scores = torch.log_softmax(logits, -1).gather(-1, torch.tensor(ids[1:]).unsqueeze(-1))
    return scores.squeeze(-1).tolist()


@pytest.fixture
def app(tiny_settings):
    with running_app(tiny_settings()) as http:
        yield http


@pytest.fixture
def client(app) -> openai.OpenAI:
    return _client(app)


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return load_model(str(tiny_model_dir))


# -- models -----------------------------------------------------------------------------------


def test_models_lists_the_served_model(app, client):
    served = app.get("/v1/model").json()
    listed = client.models.list()
    assert [m.id for m in listed.data] == [served["model"]]
    card = listed.data[0]
    assert (card.object, card.owned_by) == ("model", "editserve")
    assert client.models.retrieve(served["model"]).id == served["model"]
    raw = app.get("/v1/models")
    assert raw.headers["X-Model-Version"] == str(served["version"])
    with pytest.raises(openai.NotFoundError) as missing:
        client.models.retrieve("gpt-4o")
    assert missing.value.body["param"] == "model"
    assert missing.value.body["type"] == "not_found_error"


# -- completions ------------------------------------------------------------------------------


def test_completions_take_strings_lists_and_token_ids(app, client, tiny):
    model_id = client.models.list().data[0].id
    tok = tiny[1]
    ids = tok(PROMPT)["input_ids"]
    greedy = {"model": model_id, "max_tokens": 5, "temperature": 0}

    one = client.completions.with_raw_response.create(prompt=PROMPT, **greedy)
    version = app.get("/v1/model").json()["version"]
    assert one.headers["X-Model-Version"] == str(version)
    one = one.parse()
    assert one.object == "text_completion" and one.model == model_id
    assert one.system_fingerprint == f"editserve-v{version}"
    assert len(one.choices) == 1 and one.choices[0].finish_reason in ("length", "stop")
    text = one.choices[0].text
    assert one.usage.prompt_tokens == len(ids)
    assert one.usage.completion_tokens == 5 and one.usage.total_tokens == len(ids) + 5

    by_ids = client.completions.create(prompt=ids, **greedy)
    assert by_ids.choices[0].text == text

    many = client.completions.create(prompt=[PROMPT, "Hello there"], n=2, **greedy)
    assert [c.index for c in many.choices] == [0, 1, 2, 3]
    assert many.choices[0].text == many.choices[1].text == text  # greedy: n equal choices
    alone = client.completions.create(prompt="Hello there", **greedy).choices[0].text
    assert many.choices[2].text == many.choices[3].text == alone
    assert many.usage.prompt_tokens == len(ids) + len(tok("Hello there")["input_ids"])

    lists = client.completions.create(prompt=[ids, tok("Hello there")["input_ids"]], **greedy)
    assert [c.text for c in lists.choices] == [text, alone]

    # a stop string cuts the text before it, and says "stop"
    stop = text[2:4]
    assert stop.strip(), text
    cut = client.completions.create(prompt=PROMPT, stop=[stop, "never"], **greedy).choices[0]
    assert (cut.text, cut.finish_reason) == (text[: text.index(stop)], "stop")


def test_greedy_completion_is_generate_s_greedy_text(app, client):
    ours = client.completions.create(
        model=client.models.list().data[0].id, prompt=PROMPT, max_tokens=12, temperature=0
    )
    theirs = app.post(
        "/v1/generate", json={"inputs": PROMPT, "parameters": {"max_new_tokens": 12}}
    ).json()
    assert ours.choices[0].text == theirs["generated_text"]
    assert ours.system_fingerprint == f"editserve-v{theirs['model_version']}"


def test_a_seed_makes_sampling_reproducible(client):
    model_id = client.models.list().data[0].id

    def sample(seed: int, n: int = 1) -> list[str]:
        answer = client.completions.create(
            model=model_id, prompt=PROMPT, max_tokens=12, temperature=1.0, seed=seed, n=n
        )
        return [choice.text for choice in answer.choices]

    assert sample(7) == sample(7)
    assert sample(7, n=2) == sample(7, n=2)
    assert sample(7, n=2)[0] == sample(7)[0]  # choice i samples with seed + i
    # a random model's next-token distribution is near flat: other seeds give other texts
    assert len({tuple(sample(seed)) for seed in range(4)}) > 1


def test_a_stream_joins_to_the_completion_and_ends(client):
    model_id = client.models.list().data[0].id
    whole = client.completions.create(
        model=model_id, prompt=PROMPT, max_tokens=10, temperature=0, logprobs=2
    ).choices[0]
    chunks = list(
        client.completions.create(
            model=model_id,
            prompt=PROMPT,
            max_tokens=10,
            temperature=0,
            logprobs=2,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    texts = [c.choices[0].text for c in chunks if c.choices]
    assert len(texts) > 2 and "".join(texts) == whole.text
    ends = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert ends[-1] == whole.finish_reason and not any(ends[:-1])
    streamed = [lp for c in chunks if c.choices for lp in c.choices[0].logprobs.token_logprobs]
    assert streamed == whole.logprobs.token_logprobs and len(streamed) == 10
    offsets = [o for c in chunks if c.choices for o in c.choices[0].logprobs.text_offset]
    assert offsets == whole.logprobs.text_offset
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10

    # several prompts and choices: each choice's pieces, by index, join to its text
    many = {"model": model_id, "prompt": [PROMPT, "Hello"], "n": 2, "max_tokens": 6}
    whole = client.completions.create(**many, temperature=0)
    joined = ["", "", "", ""]
    for chunk in client.completions.create(**many, temperature=0, stream=True):
        for choice in chunk.choices:
            joined[choice.index] += choice.text
    assert joined == [choice.text for choice in whole.choices]


def test_the_stream_ends_with_done(app):
    body = {"prompt": PROMPT, "max_tokens": 3, "temperature": 0, "stream": True, "echo": True}
    reply = app.post("/v1/completions", json=body)
    assert reply.status_code == 200 and reply.headers["X-Model-Version"]
    lines = [line for line in reply.text.splitlines() if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]" and lines.count("data: [DONE]") == 1
    assert PROMPT in lines[0]  # echo: the prompt comes first


# -- chat -------------------------------------------------------------------------------------


def test_chat_completions_and_their_stream(client):
    model_id = client.models.list().data[0].id
    messages = [
        {"role": "system", "content": "You answer briefly."},
        {"role": "user", "content": [{"type": "text", "text": "Where is Atlantis?"}]},
    ]
    answer = client.chat.completions.create(
        model=model_id, messages=messages, max_tokens=8, temperature=0
    )
    assert answer.object == "chat.completion"
    choice = answer.choices[0]
    assert choice.message.role == "assistant" and choice.message.content
    # the tiny GPT-2 has no chat template: the plain "role: content" layout is completed
    layout = "system: You answer briefly.\nuser: Where is Atlantis?\nassistant:"
    plain = client.completions.create(model=model_id, prompt=layout, max_tokens=8, temperature=0)
    assert choice.message.content == plain.choices[0].text
    assert answer.usage.prompt_tokens == plain.usage.prompt_tokens

    chunks = list(
        client.chat.completions.create(
            model=model_id, messages=messages, max_tokens=8, temperature=0, stream=True
        )
    )
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    pieces = [c.choices[0].delta.content or "" for c in chunks]
    assert "".join(pieces) == choice.message.content
    assert chunks[-1].choices[0].finish_reason == choice.finish_reason

    scored = client.chat.completions.create(
        model=model_id, messages=messages, max_tokens=4, temperature=0, logprobs=True,
        top_logprobs=3,
    )  # fmt: skip
    content = scored.choices[0].logprobs.content
    assert len(content) == 4 and all(len(t.top_logprobs) == 3 for t in content)
    for token in content:  # greedy: the chosen token is the likeliest
        assert token.top_logprobs[0].token == token.token
        assert token.logprob == pytest.approx(token.top_logprobs[0].logprob)
    assert "".join(t.token for t in content) == scored.choices[0].message.content


TEMPLATE = (
    "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def test_chat_goes_through_the_tokenizer_s_chat_template(tiny_settings, tiny_model_dir, tmp_path):
    import shutil

    from transformers import AutoTokenizer

    folder = tmp_path / "templated"
    shutil.copytree(tiny_model_dir, folder)
    tok = AutoTokenizer.from_pretrained(folder)
    tok.chat_template = TEMPLATE
    tok.save_pretrained(folder)
    with running_app(tiny_settings(model=str(folder))) as http:
        client = _client(http)
        model_id = client.models.list().data[0].id
        messages = [{"role": "user", "content": "Where is Atlantis?"}]
        chat = client.chat.completions.create(
            model=model_id, messages=messages, max_tokens=6, temperature=0
        )
        rendered = "<|user|>Where is Atlantis?\n<|assistant|>"
        plain = client.completions.create(
            model=model_id, prompt=rendered, max_tokens=6, temperature=0
        )
        assert chat.choices[0].message.content == plain.choices[0].text
        assert chat.usage.prompt_tokens == plain.usage.prompt_tokens


# -- logprobs ---------------------------------------------------------------------------------


def test_echo_logprobs_score_the_prompt_as_the_model_does(client, tiny):
    """What lm-evaluation-harness sends for log-likelihoods: echo, logprobs 1, temperature 0
    and max_tokens 0 (or 1, whose extra token it drops)."""
    model, tok = tiny
    model_id = client.models.list().data[0].id
    text = "The capital of Atlantis is Rome, by the sea"
    ids = tok(text)["input_ids"]
    want = _prompt_logprobs(model, ids)

    scored = client.completions.create(
        model=model_id, prompt=text, echo=True, logprobs=1, max_tokens=0, temperature=0
    )
    choice = scored.choices[0]
    assert choice.text == text and scored.usage.completion_tokens == 0
    logprobs = choice.logprobs
    assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None
    assert logprobs.token_logprobs[1:] == pytest.approx(want, rel=1e-4, abs=1e-5)
    assert "".join(logprobs.tokens) == text
    assert logprobs.text_offset[0] == 0 and logprobs.text_offset[-1] == text.rindex(" sea")
    for token, top in zip(logprobs.tokens[1:], logprobs.top_logprobs[1:], strict=True):
        assert token in top and 1 <= len(top) <= 2  # the top one, and the chosen token

    # as token ids, with one generated token after: prompt logprobs, then the new token's
    plus_one = client.completions.create(
        model=model_id, prompt=ids, echo=True, logprobs=1, max_tokens=1, temperature=0
    ).choices[0]
    assert len(plus_one.logprobs.token_logprobs) == len(ids) + 1
    assert plus_one.logprobs.token_logprobs[1:-1] == pytest.approx(want, rel=1e-4, abs=1e-5)
    next_token = plus_one.logprobs.tokens[-1]
    assert plus_one.text == text + next_token
    with torch.no_grad():
        last = torch.log_softmax(model(torch.tensor([ids])).logits[0, -1].float(), -1)
    assert plus_one.logprobs.token_logprobs[-1] == pytest.approx(float(last.max()), rel=1e-4)
    assert plus_one.logprobs.text_offset[-1] == len(text)


def test_logprob_rows_share_the_running_batch_and_leave_other_answers_alone(tiny):
    """On the serving loop itself: a plain row, a row with logprobs and a row that only
    scores its prompt, admitted together (prefilled apart, then merged into one batch):
    every text is the one it gets alone, and every logprob is the model's own."""
    model, tok = tiny
    prompts = [PROMPT, "Once upon a time there was", "Hello"]

    async def generate(requests):
        """All queued before the loop starts, so they are admitted together."""
        loop = ServingLoop(model, tok)
        try:
            tasks = [asyncio.ensure_future(loop.generate(r)) for r in requests]
            await asyncio.sleep(0)
            loop.start()
            return await asyncio.wait_for(asyncio.gather(*tasks), HANG)
        finally:
            loop.close()

    alone = [asyncio.run(generate([GenerationRequest(p, SamplingParams(8))]))[0] for p in prompts]
    requests = [
        GenerationRequest(prompts[0], SamplingParams(8)),
        GenerationRequest(prompts[1], SamplingParams(8), logprobs=2, prompt_logprobs=0),
        GenerationRequest(prompts[2], SamplingParams(0), prompt_logprobs=3),
    ]
    plain, scored, score_only = asyncio.run(generate(requests))
    assert (plain.text, plain.logprobs, plain.prompt_logprobs) == (alone[0].text, None, None)
    assert scored.text == alone[1].text and scored.token_ids == alone[1].token_ids
    assert score_only.token_ids == [] and score_only.text == ""

    everything = scored.prompt_ids + scored.token_ids
    want = _prompt_logprobs(model, everything)
    assert scored.prompt_logprobs[0] is None
    got = [e.logprob for e in scored.prompt_logprobs[1:]] + [e.logprob for e in scored.logprobs]
    assert got == pytest.approx(want, rel=1e-4, abs=1e-5)
    for entry in scored.logprobs:  # greedy: the chosen token is the likeliest of the two
        assert len(entry.top) == 2 and entry.top[0][0] == entry.token

    ids = tok("Hello")["input_ids"]
    assert score_only.prompt_ids == ids and len(score_only.prompt_logprobs) == len(ids)
    rows = [e for e in score_only.prompt_logprobs[1:]]
    assert [e.logprob for e in rows] == pytest.approx(_prompt_logprobs(model, ids), rel=1e-4)
    assert all(len(e.top) == 3 for e in rows)


# -- edits ------------------------------------------------------------------------------------

# the fact model memorises its answers (see test_fact_model.py): ROME there raises the new
# target by orders of magnitude without overturning the answer; a GRACE codebook entry
# overturns it (test_composition.py)
HPARAMS = {
    "rome": {"layer": 1, "clamp_norm_factor": 4.0, "steps": 60, "lr": 2.0, "prefixes": 0},
    "grace": {"layer": 3, "steps": 200, "lr": 0.5},
}


def test_edits_change_the_answer_and_the_fingerprint(tiny_settings, fact_model_folder, fact_facts):
    fact = fact_facts[0]
    prompt = fact["prompt"].format(fact["subject"])
    target = fact["target_new"].split()[0]
    with running_app(tiny_settings(model=str(fact_model_folder))) as http:
        client = _client(http)
        model_id = client.models.list().data[0].id

        def edit(method: str) -> int:
            body = {
                "edit": {k: fact[k] for k in ("prompt", "subject", "target_new")},
                "method": method,
                "hparams": HPARAMS[method],
            }
            reply = http.post("/v1/edits", json=body)
            assert reply.status_code == 202, reply.json()
            assert wait_job(http, reply.json()["job_id"])["status"] == "applied"
            return http.get("/v1/model").json()["version"]  # has the served model follow

        def target_logprob() -> tuple[float, str]:
            scored = client.completions.create(
                model=model_id, prompt=f"{prompt} {target}", max_tokens=0, echo=True,
                logprobs=1, temperature=0,
            )  # fmt: skip
            return scored.choices[0].logprobs.token_logprobs[-1], scored.system_fingerprint

        def answer() -> openai.types.Completion:
            return client.completions.create(
                model=model_id, prompt=prompt, max_tokens=1, temperature=0
            )

        before, base = target_logprob()
        assert answer().choices[0].text.split() != [target]
        rome_version = edit("rome")
        after, edited = target_logprob()
        assert after - before > math.log(2), (before, after)
        assert (base, edited) == ("editserve-v0", f"editserve-v{rome_version}")

        grace_version = edit("grace")
        flipped = answer()
        assert flipped.choices[0].text.split() == [target]
        assert flipped.system_fingerprint == f"editserve-v{grace_version}" != edited
        chat = client.chat.completions.create(
            model=model_id, messages=[{"role": "user", "content": prompt}], max_tokens=1
        )
        assert chat.system_fingerprint == flipped.system_fingerprint


# -- errors -----------------------------------------------------------------------------------


def _refused(error: type[openai.APIStatusError], call, param: str | None) -> dict:
    with pytest.raises(error) as refused:
        call()
    body = refused.value.body
    assert set(body) == {"message", "type", "param", "code"} and body["message"], body
    assert body["param"] == param, body
    return body


def test_bad_input_is_refused_in_openai_s_shape(app, client, tiny_settings):
    model_id = client.models.list().data[0].id
    limit = tiny_settings().max_new_tokens

    def complete(**extra):
        return lambda: client.completions.create(
            **{"model": model_id, "prompt": PROMPT, "max_tokens": 2, **extra}
        )

    def chat(messages, **extra):
        return lambda: client.chat.completions.create(
            **{"model": model_id, "messages": messages, "max_tokens": 2, **extra}
        )

    unknown = _refused(openai.NotFoundError, complete(model="gpt-4o"), "model")
    assert "gpt-4o" in unknown["message"] and unknown["type"] == "not_found_error"
    _refused(openai.NotFoundError, chat([{"role": "user", "content": "x"}], model="x"), "model")
    many = _refused(openai.BadRequestError, complete(n=9), "n")
    assert many["type"] == "invalid_request_error"
    over = _refused(openai.BadRequestError, complete(max_tokens=limit + 1), "max_tokens")
    assert str(limit) in over["message"]
    _refused(openai.BadRequestError, complete(max_tokens=510), "max_tokens")  # past 512
    _refused(openai.BadRequestError, complete(prompt=[]), "prompt")
    _refused(openai.BadRequestError, complete(prompt=[10**7]), "prompt")
    _refused(openai.BadRequestError, complete(stop=["a", "b", "c", "d", "e"]), "stop")
    _refused(openai.BadRequestError, complete(logprobs=6), "logprobs")
    _refused(openai.BadRequestError, complete(presence_penalty=1.0), "presence_penalty")
    _refused(openai.BadRequestError, chat([]), "messages")
    _refused(openai.BadRequestError, chat([{"role": "user"}]), "messages")
    _refused(openai.BadRequestError, chat([{"role": "user", "content": "x"}], n=9), "n")
    _refused(
        openai.BadRequestError,
        chat([{"role": "user", "content": "x"}], max_completion_tokens=limit + 1),
        "max_completion_tokens",
    )
    _refused(
        openai.BadRequestError, chat([{"role": "user", "content": "x"}], top_logprobs=2),
        "top_logprobs",
    )  # fmt: skip
    # the rest of the API keeps the service's own shape
    own = app.post("/v1/generate", json={"inputs": PROMPT, "parameters": {"max_new_tokens": -1}})
    assert own.status_code == 422 and own.json()["field"] == "parameters.max_new_tokens"


def test_keys_are_checked_and_refusals_are_in_openai_s_shape(tiny_settings):
    from service.auth import KeyStore
    from service.ledger.db import make_engine, migrate, session_factory

    settings = tiny_settings(auth="keys")
    migrate(settings.resolved_database_url)
    store = KeyStore(session_factory(make_engine(settings.resolved_database_url)))
    _, reader = store.create("reader", ["generate"])
    _, evaluator = store.create("evaluator", ["evaluate"])
    with running_app(settings) as http:
        keyless = {"Authorization": openai.Omit()}  # the client sends no key at all
        missing = _refused(
            openai.AuthenticationError,
            lambda: _client(http).models.list(extra_headers=keyless),
            None,
        )
        assert missing["type"] == "authentication_error" and "missing" in missing["message"]
        assert missing["code"] == "unauthorized"
        _refused(
            openai.AuthenticationError,
            lambda: _client(http, reader + "x").completions.create(
                model="m", prompt="x", max_tokens=1
            ),
            None,
        )
        client = _client(http, reader)
        model_id = client.models.list().data[0].id
        assert client.completions.create(model=model_id, prompt="Hi", max_tokens=1).choices
        # a key without the generate scope may list models, not generate
        other = _client(http, evaluator)
        assert other.models.list().data[0].id == model_id
        _refused(
            openai.PermissionDeniedError,
            lambda: other.completions.create(model=model_id, prompt="Hi", max_tokens=1),
            None,
        )
        own = http.post("/v1/generate", json={"inputs": "Hi"})
        assert own.status_code == 401 and own.json()["type"] == "unauthorized"


# -- a real server ----------------------------------------------------------------------------


def _decoded(url: str) -> float:
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith("editserve_decoded_tokens_total "):
            return float(line.split()[1])
    raise AssertionError("no editserve_decoded_tokens_total in /metrics")


def test_a_chat_stream_its_client_closes_stops_generating(tiny_settings, tmp_path):
    """A real `editserve serve` process: the openai client reads two chunks of a 400-token
    stream and closes it; the server stops decoding for it within a few steps."""
    server = ServiceProcess(tiny_settings(), "serve", tmp_path / "serve.log").start()
    try:
        deadline = time.monotonic() + 300
        while not server.ready():
            assert time.monotonic() < deadline, "the server did not become ready"
            time.sleep(0.2)
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0)
        model_id = client.models.list().data[0].id
        before = _decoded(server.url)
        messages = [{"role": "user", "content": "Once upon a time"}]
        stream = client.chat.completions.create(
            model=model_id, messages=messages, max_tokens=400, temperature=0, stream=True
        )
        for count, _ in enumerate(stream):
            if count == 2:
                break
        stream.close()
        last, still = -1.0, 0
        while still < 5:  # until the count stops moving
            now = _decoded(server.url)
            still = still + 1 if now == last else 0
            last = now
            time.sleep(0.1)
        assert last - before < 40, f"{last - before} tokens decoded after a 3-chunk stream"
        full = client.chat.completions.create(
            model=model_id, messages=messages, max_tokens=400, temperature=0
        )
        assert full.usage.completion_tokens > 40  # the same request, not closed, runs long
    finally:
        server.stop()


# -- fuzzing ----------------------------------------------------------------------------------


def test_no_openai_request_crashes_the_server_and_refusals_are_openai_shaped(tiny_settings):
    """Schemathesis cases for the OpenAI routes only, from the app's OpenAPI schema."""
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    paths = {"/v1/models", "/v1/models/{model_id}", "/v1/completions", "/v1/chat/completions"}
    with running_app(tiny_settings(max_new_tokens=8)) as http:
        schema = schemathesis.openapi.from_dict(http.get("/openapi.json").json())
        operations = [r.ok() for r in schema.get_all_operations() if r.ok().path in paths]
        assert {op.path for op in operations} == paths

        @given(data=st.data())
        @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
        def check(data):
            case = data.draw(data.draw(st.sampled_from(operations)).as_strategy())
            kwargs = case.as_transport_kwargs(base_url="http://testserver")
            response = http.request(
                kwargs["method"],
                kwargs["url"],
                params=kwargs.get("params"),
                headers=kwargs.get("headers"),
                json=kwargs.get("json"),
                content=kwargs.get("data"),
            )
            where = f"{case.method} {case.formatted_path}"
            assert response.status_code < 500, (where, response.text)
            if response.status_code >= 400:
                error = response.json()["error"]
                assert error["message"] and error["type"], (where, response.text)

        check()
