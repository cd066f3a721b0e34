"""IKE (in-context knowledge editing): an edit is a memory entry, carried in the patch bytes
and rebuilt from the chain like GRACE's codebook; the relevant entries go before a prompt as
demonstrations, in the serving path, and a prompt near none is served exactly as before."""

from __future__ import annotations

import asyncio
from copy import deepcopy

import pytest
import torch

from editors import EditRequest
from editors.errors import InvalidValueError, PatchError
from editors.ike import IKEHyperParams, compute, memory_entry
from editors.memory import Memory, memory_of
from editors.methods import METHODS
from editors.metrics import evaluate
from editors.patch import FactoredDelta, Patch
from editors.tiny import tiny_random_model
from editors.weight_state import WeightState
from service.engine.generation import GenerationRequest, SamplingParams, generate_batch
from service.engine.scheduler import ServingLoop

from .service_support import post_edit, running_app, wait_job

EIFFEL = EditRequest(
    "The Eiffel Tower is located in the city of",
    "Eiffel Tower",
    "Rome",
    paraphrases=("Where is the {} located?",),
    locality=(("The capital of Japan is", "Tokyo"),),
)
DARRIEUX = EditRequest("The mother tongue of {} is", "Danielle Darrieux", "English")
RELATED = "In which city is the Eiffel Tower?"
UNRELATED = "Michael Jordan plays the sport of"


def ike_patch(*requests: EditRequest, **overrides) -> Patch:
    return compute(None, None, list(requests), IKEHyperParams(**overrides)).patch


@pytest.fixture(scope="module")
def tiny(gpt2_tok):
    return tiny_random_model("llama", len(gpt2_tok)), gpt2_tok


def test_bad_ike_hyperparameters_are_named():
    method = METHODS["ike"]
    assert not method.needs_statistics and not method.subtractable
    assert not method.writes_weights
    for name, value in [("top_k", 0), ("min_similarity", 1.5), ("max_demos", 0)]:
        with pytest.raises(InvalidValueError) as caught:
            method.hparams("llama", {name: value})
        assert caught.value.field == name


def test_an_ike_edit_is_memory_entries_that_survive_the_patch_bytes():
    patch = ike_patch(EIFFEL, DARRIEUX)
    assert patch.deltas == {} and len(patch.memories) == 2
    entry = patch.memories[0]
    fact = "The Eiffel Tower is located in the city of Rome"
    assert entry.fact == fact
    assert entry.demonstrations.startswith(f"New Fact: {fact}\nPrompt: {fact}\n\n")
    assert "Prompt: Where is the Eiffel Tower located? Rome\n\n" in entry.demonstrations
    assert "Prompt: The capital of Japan is Tokyo\n\n" in entry.demonstrations
    data = patch.to_bytes()
    assert data == ike_patch(EIFFEL, DARRIEUX).to_bytes()  # deterministic
    again = Patch.from_bytes(data, patch.sha256)
    assert again.memories == patch.memories and again.to_bytes() == data
    assert not again.subtractable
    with pytest.raises(PatchError):
        again.negated()
    merged = ike_patch(EIFFEL).merged(ike_patch(DARRIEUX))
    assert merged.memories == patch.memories


def test_the_memory_is_rebuilt_from_the_chain_and_composes_with_weight_edits(tiny):
    model, _ = tiny
    weights = WeightState(model)
    base = weights.checksum()
    name = "model.layers.0.mlp.down_proj.weight"
    shape = model.get_parameter(name).shape
    weight_edit = Patch(
        "rome", {name: FactoredDelta(torch.ones(shape[0], 1), torch.ones(shape[1], 1))}
    )
    first, second = ike_patch(EIFFEL), ike_patch(DARRIEUX)
    copy_of_base = deepcopy(model)
    try:
        chain = [weight_edit, first, weight_edit, second]
        for patch in chain:
            weights.apply(patch)
        assert [e.fact for e in memory_of(model).entries] == [
            EIFFEL.text + " Rome",
            DARRIEUX.text + " English",
        ]
        head = weights.checksum()
        assert weights.tracked == [name]
        weights.restore(chain[:3])  # a rollback takes the later entry away
        assert len(memory_of(model)) == 1 and weights.checksum() != head
        snapshot = weights.snapshot()
        weights.apply(second)
        weights.reset_to(snapshot)
        assert len(memory_of(model)) == 1
        weights.restore(chain)
        assert weights.checksum() == head
        # a restart: a fresh copy of the base replays the chain to the same memory and sum
        fresh = WeightState(copy_of_base)
        for patch in chain:  # as the replayer replays: patch by patch
            fresh.apply(Patch.from_bytes(patch.to_bytes()))
        assert fresh.checksum() == head
        assert memory_of(fresh.model).entries == memory_of(model).entries
        weights.restore([])
        assert memory_of(model) is None and weights.checksum() == base
    finally:
        weights.restore([])


def test_retrieval_picks_the_relevant_entry_and_none_for_an_unrelated_prompt():
    memory = Memory(ike_patch(EIFFEL, DARRIEUX).memories)
    found = memory.retrieve(RELATED)
    assert [entry.fact for entry, _ in found] == [EIFFEL.text + " Rome"]
    assert memory.retrieve(UNRELATED) == [] and memory.context_for(UNRELATED) is None
    context = memory.context_for(RELATED)
    assert context.endswith(f"New Fact: {EIFFEL.text} Rome\nPrompt: ")
    assert memory.retrieve("What language did Danielle Darrieux speak?")[0][0].fact.endswith(
        "English"
    )
    strict = Memory(ike_patch(EIFFEL, min_similarity=0.99).memories)
    assert strict.retrieve(RELATED) == []


def _serve(model, tok, requests: list[GenerationRequest]):
    loop = ServingLoop(model, tok)
    loop.start()
    try:

        async def run():
            return await asyncio.gather(*(loop.generate(r) for r in requests))

        return asyncio.run(run())
    finally:
        loop.close()


def test_an_unrelated_prompt_is_served_byte_identically_and_context_is_never_echoed(tiny):
    model, tok = tiny
    weights = WeightState(model)
    params = SamplingParams(max_new_tokens=8)

    def requests():
        return [
            GenerationRequest(UNRELATED, params, prompt_logprobs=2),
            GenerationRequest(RELATED, params, prompt_logprobs=2),
        ]

    def serve_each():  # one at a time: a batch's padding would change the floats anyway
        return [_serve(model, tok, [request])[0] for request in requests()]

    def static_each():
        return [generate_batch(model, tok, [request])[0] for request in requests()]

    before, static_before = serve_each(), static_each()
    try:
        weights.apply(ike_patch(EIFFEL))
        after, static_after = serve_each(), static_each()
    finally:
        weights.restore([])
    plain, related = before
    assert after[0].text == plain.text and after[0].token_ids == plain.token_ids
    assert after[0].prompt_ids == plain.prompt_ids
    assert after[0].prompt_logprobs == plain.prompt_logprobs
    assert static_after[0].token_ids == static_before[0].token_ids
    assert static_after[0].text == static_before[0].text
    # the related prompt was answered with the demonstrations before it, which the output
    # leaves out: the prompt as sent, its token count and one logprob row per token
    assert after[1].prompt_ids == related.prompt_ids
    assert after[1].prompt_tokens == related.prompt_tokens
    assert len(after[1].prompt_logprobs) == len(related.prompt_ids)
    assert after[1].prompt_logprobs[0] is None
    assert "New Fact" not in after[1].text
    assert static_after[1].prompt_ids == related.prompt_ids


def test_ike_is_served_rolled_back_and_replayed_through_the_api(tiny_settings):
    settings = tiny_settings()

    def say(client, prompt: str) -> dict:
        body = {"inputs": prompt, "parameters": {"max_new_tokens": 6}}
        return client.post("/v1/generate", json=body).json()

    def complete(client, prompt: str) -> dict:
        body = {"prompt": prompt, "max_tokens": 4, "temperature": 0, "echo": True, "logprobs": 1}
        return client.post("/v1/completions", json=body).json()

    with running_app(settings) as client:
        unrelated = say(client, UNRELATED)
        related = complete(client, RELATED)
        fact = EIFFEL
        accepted = post_edit(client, fact.prompt, fact.subject, fact.target_new, method="ike")
        job = wait_job(client, accepted["job_id"])
        assert job["status"] == "applied", job
        model = client.get("/v1/model").json()
        assert model["checksum"] != model["base_checksum"]  # the memory is in the sum
        assert model["edited_parameters"] == []
        edited_checksum = model["checksum"]
        assert say(client, UNRELATED)["generated_text"] == unrelated["generated_text"]
        echoed = complete(client, RELATED)
        text = echoed["choices"][0]["text"]
        assert text.startswith(RELATED) and "New Fact" not in text
        assert echoed["usage"]["prompt_tokens"] == related["usage"]["prompt_tokens"]
        tokens = echoed["choices"][0]["logprobs"]["tokens"]
        assert "".join(tokens).startswith(RELATED)
        chat = client.post(
            "/v1/chat/completions",
            json={"messages": [{"role": "user", "content": RELATED}], "max_tokens": 4},
        )
        assert (
            chat.status_code == 200
            and "New Fact" not in chat.json()["choices"][0]["message"]["content"]
        )
        subtract = client.post(
            f"/v1/edits/{accepted['edit_ids'][0]}/revert", json={"mode": "subtract"}
        )
        assert subtract.status_code == 422 and subtract.json()["field"] == "mode"

    with running_app(settings) as client:  # a restart replays the memory from the ledger
        assert client.get("/v1/model").json()["checksum"] == edited_checksum
        rolled = client.post("/v1/rollback", json={"to_version": 0}).json()
        assert rolled["status"] == "applied"
        model = client.get("/v1/model").json()
        assert model["checksum"] == model["base_checksum"]
        assert say(client, UNRELATED)["generated_text"] == unrelated["generated_text"]


@pytest.mark.slow
def test_smollm2_says_the_edited_facts_after_ike_edits(smollm2_editor):
    """Two IKE edits (two patches) on SmolLM2-135M-Instruct: each prompt about an edited
    fact gets its own entry's demonstrations and says the new target, paraphrases too; a
    prompt about neither is answered token for token as before."""
    editor = smollm2_editor
    model, tok = editor.model, editor.tok
    jordan = EditRequest("{} plays the sport of", "Michael Jordan", "baseball")
    prompts = {
        "English": [
            "The mother tongue of Danielle Darrieux is",
            "Danielle Darrieux's native language is",
        ],
        "baseball": ["Michael Jordan plays the sport of", "Michael Jordan is a professional"],
    }
    unrelated = "The Eiffel Tower is located in the city of"
    params = SamplingParams(max_new_tokens=4)

    def first_words(outputs) -> list[str]:
        return [o.text.split()[0].strip(".,") if o.text.split() else "" for o in outputs]

    asked = [p for target in prompts for p in prompts[target]]
    wanted = [target for target in prompts for _ in prompts[target]]
    before = generate_batch(model, tok, [GenerationRequest(p, params) for p in asked])
    plain_before = _serve(model, tok, [GenerationRequest(unrelated, params)])[0]
    assert all(b != w for b, w in zip(first_words(before), wanted, strict=True)), before
    weights = WeightState(model)
    try:
        weights.apply(editor.compute([DARRIEUX], "ike").patch)
        weights.apply(editor.compute([jordan], "ike").patch)
        after = [_serve(model, tok, [GenerationRequest(p, params)])[0] for p in asked]
        plain_after = _serve(model, tok, [GenerationRequest(unrelated, params)])[0]
        scores = evaluate(model, tok, [DARRIEUX, jordan])  # the metrics read the memory too
    finally:
        weights.restore([])
    assert memory_of(model) is None
    assert first_words(after) == wanted, [o.text for o in after]
    assert all("New Fact" not in o.text.split("\n")[0] for o in after)
    assert plain_after.token_ids == plain_before.token_ids
    assert plain_after.text == plain_before.text
    assert scores["reliability"] == 1.0 and scores["free_rewrite"] == 1.0, scores


def test_memory_entry_keys_hold_the_question_and_its_paraphrases():
    entry = memory_entry(EIFFEL, IKEHyperParams(update_demos=False, retain_demos=False))
    assert entry.keys == (EIFFEL.text, "Where is the Eiffel Tower located?")
    assert entry.demonstrations.count("New Fact:") == 1
