"""Added neurons (editors/neurons.py) and the two methods that add them, T-Patcher and
CaliNet, on tiny models of every family: the MLP output becomes out(x) + act(x K^T + b) V;
no parameter changes; the neurons travel in the patch bytes, stack, revert exactly, compose
with weight edits before and after them and are rebuilt from the chain of patches."""

from __future__ import annotations

import copy

import pytest
import torch

from editors import EditRequest, apply_patch, revert_patch
from editors.calinet import CaliNetHyperParams
from editors.editor import Editor
from editors.errors import InvalidValueError, LayerOutOfRangeError, PatchError
from editors.methods import METHODS
from editors.metrics import evaluate
from editors.neurons import ACTIVATIONS, AddedNeurons, added_output, neurons_of, set_neurons
from editors.patch import Patch
from editors.tiny import TINY_CONFIGS, tiny_random_model
from editors.tpatcher import TPatcherHyperParams
from editors.weight_state import WeightState

from .conftest import assert_same_weights, weights_snapshot

FAMILIES = sorted(TINY_CONFIGS)
FIRST = EditRequest("The mother tongue of {} is", "Danielle Darrieux", "English")
SECOND = EditRequest("{} plays the position of", "Ricky Rubio", "goalkeeper")
# Prompts that do not end on the edit prompt's last token: in a random model the last
# layer's MLP input is mostly the token's own embedding, context barely moves it.
UNRELATED = ["The weather in spring was", "She walked to the market and bought", "One, two,"]
FAST = {
    "t-patcher": {"steps": 30, "prefixes": 1, "prefix_length": 4},
    "calinet": {"steps": 12, "slots": 4, "prefixes": 1, "prefix_length": 4},
}
METHOD_NAMES = sorted(FAST)


def _logits(editor: Editor, text: str) -> torch.Tensor:
    ids = editor.tok(text, return_tensors="pt")
    with torch.no_grad():
        return editor.model(**ids).logits


@pytest.fixture(scope="module")
def editors_by_family(gpt2_tok):
    return {f: Editor(tiny_random_model(f, len(gpt2_tok)), gpt2_tok, None) for f in FAMILIES}


@pytest.fixture(scope="module")
def llama(tiny_llama_editor_factory):
    return tiny_llama_editor_factory()  # with statistics, for ROME


def test_added_neurons_add_act_of_x_keys_plus_bias_times_values():
    model = tiny_random_model("llama", 64)
    mlp = model.get_submodule("model.layers.1.mlp")
    g = torch.Generator().manual_seed(0)
    keys, values = torch.randn(3, 64, generator=g), torch.randn(3, 64, generator=g)
    bias = torch.tensor([0.5, -0.5, 0.0])
    codes = torch.tensor([ACTIVATIONS["relu"], ACTIVATIONS["silu"], ACTIVATIONS["gelu"]])
    neurons = AddedNeurons(keys, bias, values, codes)
    x = torch.randn(2, 5, 64, generator=g)
    with torch.no_grad():
        plain = mlp(x)
        set_neurons(mlp, neurons)
        added = mlp(x)
        set_neurons(mlp, None)
        again = mlp(x)
    pre = x @ keys.T + bias
    acts = torch.stack(
        [
            torch.relu(pre[..., 0]),
            torch.nn.functional.silu(pre[..., 1]),
            torch.nn.functional.gelu(pre[..., 2]),
        ],
        -1,
    )
    torch.testing.assert_close(added, plain + acts @ values)
    assert torch.equal(again, plain)
    with pytest.raises(ValueError):
        AddedNeurons(keys, bias, values, torch.tensor([0, 1, 9]))
    # gradients reach the layers below through the neurons (a later edit's training)
    served, by_hand = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    set_neurons(mlp, neurons)
    mlp(served).square().sum().backward()
    set_neurons(mlp, None)
    (mlp(by_hand) + added_output(by_hand, keys, bias, values, codes)).square().sum().backward()
    torch.testing.assert_close(served.grad, by_hand.grad)


@pytest.mark.parametrize("method", METHOD_NAMES)
@pytest.mark.parametrize("family", FAMILIES)
def test_neurons_apply_revert_exactly_and_replay_from_their_bytes(
    editors_by_family, family, method
):
    editor = editors_by_family[family]
    model = editor.model
    snapshot = weights_snapshot(model)
    before = _logits(editor, FIRST.text)
    result = editor.compute([FIRST], method, FAST[method])
    assert_same_weights(model, snapshot)  # computing changes nothing
    assert torch.equal(_logits(editor, FIRST.text), before)
    patch = result.patch
    assert patch.deltas == {} and not patch.codebooks and not patch.subtractable
    ((path, neurons),) = patch.neurons.items()
    layer = result.diagnostics.layers[0]
    assert path == f"{editor.spec.layers}.{layer}.mlp" and layer == 3  # the last layer
    expected = 4 if method == "calinet" else 1  # T-Patcher: one per target token
    assert len(neurons) == expected and result.diagnostics.extra["neurons"] == expected

    data = patch.to_bytes()
    again = Patch.from_bytes(data, expected_sha256=patch.sha256)
    assert again.sha256 == patch.sha256
    for name, tensor in neurons.tensors().items():
        assert torch.equal(again.neurons[path].tensors()[name], tensor)
    # the same edit on the same weights: the same bytes
    assert editor.compute([FIRST], method, FAST[method]).patch.to_bytes() == data

    applied = apply_patch(model, again)
    try:
        assert_same_weights(model, snapshot)  # no parameter moved
        edited = _logits(editor, FIRST.text)
        assert not torch.equal(edited, before)
    finally:
        revert_patch(model, applied)
    assert neurons_of(model.get_submodule(path)) is None
    assert torch.equal(_logits(editor, FIRST.text), before)  # bit for bit

    # served through WeightState: rebuilt from the chain, part of the checksum
    state = WeightState(model)
    base_sum = state.checksum()
    state.apply(patch)
    assert state.checksum() != base_sum and state.tracked == []
    assert torch.equal(_logits(editor, FIRST.text), edited)
    state.restore([])
    assert state.checksum() == base_sum and torch.equal(_logits(editor, FIRST.text), before)


@pytest.mark.parametrize("family", ["gpt2", "gpt_neox", "llama"])
def test_a_t_patcher_neuron_fires_on_its_edit_and_is_silent_elsewhere(editors_by_family, family):
    editor = editors_by_family[family]
    result = editor.compute([FIRST], "t-patcher", {"steps": 60})
    extra = result.diagnostics.extra
    assert extra["edit_activation_min"] > 0 > extra["memory_activation_max"]
    before = {text: _logits(editor, text) for text in UNRELATED}
    answer_before = evaluate(editor.model, editor.tok, [FIRST])["reliability"]
    applied = apply_patch(editor.model, result.patch)
    try:
        for text in UNRELATED:  # ReLU(pre-activation < 0) = 0: the outputs exactly as before
            assert torch.equal(_logits(editor, text), before[text]), text
        assert evaluate(editor.model, editor.tok, [FIRST])["reliability"] == 1.0
    finally:
        revert_patch(editor.model, applied)
    assert answer_before < 1.0


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_two_patches_stack_and_revert_in_order(editors_by_family, method):
    editor = editors_by_family["llama"]
    steps = 60 if method == "t-patcher" else FAST[method]["steps"]
    model, overrides = editor.model, {**FAST[method], "steps": steps}
    first = editor.compute([FIRST], method, overrides).patch
    second = editor.compute([SECOND], method, overrides).patch
    (path,) = first.neurons
    merged = first.merged(second)
    n_first, n_second = len(first.neurons[path]), len(second.neurons[path])
    assert len(merged.neurons[path]) == n_first + n_second
    assert Patch.from_bytes(merged.to_bytes()).sha256 == merged.sha256
    module = model.get_submodule(path)
    base = {r.text: _logits(editor, r.text) for r in (FIRST, SECOND)}
    outer = apply_patch(model, first)
    one = {r.text: _logits(editor, r.text) for r in (FIRST, SECOND)}
    inner = apply_patch(model, second)
    try:
        stacked = neurons_of(module)
        assert len(stacked) == n_first + n_second
        assert torch.equal(stacked.keys[:n_first].cpu(), first.neurons[path].keys)
        if method == "t-patcher":
            assert evaluate(model, editor.tok, [FIRST, SECOND])["reliability"] == 1.0
        revert_patch(model, inner)
        assert len(neurons_of(module)) == n_first
        for text, logits in one.items():
            assert torch.equal(_logits(editor, text), logits)
    finally:
        revert_patch(model, outer)
    assert neurons_of(module) is None
    for text, logits in base.items():
        assert torch.equal(_logits(editor, text), logits)
    # the same stack as one merged patch, and through WeightState in either form
    state = WeightState(model)
    state.apply(first)
    state.apply(second)
    stacked_sum, stacked_logits = state.checksum(), _logits(editor, FIRST.text)
    state.restore([merged])
    assert state.checksum() == stacked_sum
    assert torch.equal(_logits(editor, FIRST.text), stacked_logits)
    state.restore([first])
    assert len(neurons_of(module)) == n_first
    state.restore([])
    assert neurons_of(module) is None


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_neurons_compose_with_weight_edits_before_and_after(llama, method):
    """FT, then the neurons, then ROME: each computed on the weights the earlier ones made;
    a fresh copy replayed from the bytes has the same checksum and outputs, and taking the
    patches back in reverse order restores every step exactly."""
    editor = llama
    model = editor.model
    snapshot = weights_snapshot(model)
    copied = copy.deepcopy(model)  # a replica at the base weights
    state = WeightState(model)
    base_logits, base_sum = _logits(editor, FIRST.text), state.checksum()
    steps = [
        ("ft-l", [SECOND], {"steps": 5}),
        (method, [FIRST], FAST[method]),
        ("rome", [SECOND], {"steps": 5, "prefixes": 1, "prefix_length": 4}),
    ]
    patches, sums, logits = [], [], []
    for name, requests, overrides in steps:
        patch = editor.compute(requests, name, overrides).patch
        state.apply(patch)
        patches.append(Patch.from_bytes(patch.to_bytes()))
        sums.append(state.checksum())
        logits.append(_logits(editor, FIRST.text))
    assert patches[1].neurons and patches[0].deltas and patches[2].deltas
    assert len(set(sums)) == 3

    replica = WeightState(copied)
    assert replica.checksum() == base_sum
    for patch, checksum in zip(patches, sums, strict=True):
        replica.apply(patch)
        assert replica.checksum() == checksum
    ids = editor.tok(FIRST.text, return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(copied(**ids).logits, logits[-1])

    for keep in (2, 1, 0):  # rollback: the chain's first `keep` patches
        state.restore(patches[:keep])
        assert state.checksum() == (sums[keep - 1] if keep else base_sum)
        assert torch.equal(_logits(editor, FIRST.text), logits[keep - 1] if keep else base_logits)
    assert_same_weights(model, snapshot)
    assert neurons_of(model.get_submodule(next(iter(patches[1].neurons)))) is None

    # apply_patch / revert_patch: the same arithmetic, exact in reverse order
    applied = [apply_patch(model, patch) for patch in patches]
    assert torch.equal(_logits(editor, FIRST.text), logits[-1])
    for record in reversed(applied):
        revert_patch(model, record)
    assert_same_weights(model, snapshot)
    assert torch.equal(_logits(editor, FIRST.text), base_logits)


def test_neurons_for_a_missing_or_mismatched_module_are_refused(editors_by_family):
    model = editors_by_family["llama"].model
    neurons = AddedNeurons.of(torch.zeros(1, 3), torch.zeros(1), torch.zeros(1, 3), "relu")
    for path in ("model.layers.99.mlp", "model.layers.1.mlp"):
        with pytest.raises(PatchError):
            apply_patch(model, Patch("t-patcher", {}, neurons={path: neurons}))
        with pytest.raises(PatchError):
            WeightState(model).apply(Patch("t-patcher", {}, neurons={path: neurons}))
    assert neurons_of(model.get_submodule("model.layers.1.mlp")) is None
    with pytest.raises(PatchError):
        Patch("t-patcher", {}, neurons={"model.layers.1.mlp": neurons}).negated()


def test_the_methods_are_registered_without_statistics_or_subtraction():
    for name in METHOD_NAMES:
        method = METHODS[name]
        assert not method.needs_statistics and not method.subtractable
        assert method.writes_weights  # they change what the layers above a codebook read
        assert method.statistics_layers(method.hparams("llama"), 4) == []


@pytest.mark.parametrize(
    ("kind", "overrides", "field"),
    [
        (TPatcherHyperParams, {"steps": 0}, "steps"),
        (TPatcherHyperParams, {"lr": -1.0}, "lr"),
        (TPatcherHyperParams, {"memory_margin": 0.5}, "memory_margin"),
        (TPatcherHyperParams, {"activation_margin": 0.0}, "activation_margin"),
        (TPatcherHyperParams, {"memory_weight": -1.0}, "memory_weight"),
        (TPatcherHyperParams, {"activation": "tanh"}, "activation"),
        (CaliNetHyperParams, {"slots": 0}, "slots"),
        (CaliNetHyperParams, {"slots": 100_000}, "slots"),
        (CaliNetHyperParams, {"locality_weight": -0.1}, "locality_weight"),
        (CaliNetHyperParams, {"activation": "softmax"}, "activation"),
        (CaliNetHyperParams, {"key_lr": 0.0}, "key_lr"),
    ],
)
def test_bad_hyperparameters_are_named(kind, overrides, field):
    with pytest.raises(InvalidValueError) as caught:
        kind(**overrides)
    assert caught.value.field == field


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_a_layer_past_the_model_is_named(editors_by_family, method):
    with pytest.raises(LayerOutOfRangeError) as caught:
        editors_by_family["gpt2"].compute([FIRST], method, {"layer": 4})
    assert caught.value.field == "layer"


@pytest.mark.slow
@pytest.mark.parametrize("method", METHOD_NAMES)
def test_smollm2_says_the_new_target_after_one_edit_and_rolls_back_exactly(smollm2_editor, method):
    from editors.tokens import encode_prompt

    editor = smollm2_editor
    model, tok = editor.model, editor.tok
    request = EditRequest("The mother tongue of {} is", "Danielle Darrieux", "English")
    snapshot = weights_snapshot(model)
    device = next(model.parameters()).device

    def greedy(text: str, tokens: int = 4) -> str:
        ids = torch.tensor([encode_prompt(tok, text)], device=device)
        with torch.no_grad():
            out = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=tokens,
                do_sample=False,
                pad_token_id=tok.eos_token_id,
            )
        return tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)

    unrelated = "The capital of France is"
    before, other_before = greedy(request.text), greedy(unrelated)
    base_logits = _logits(editor, request.text)
    assert "English" not in before
    result = editor.compute([request], method)
    assert_same_weights(model, snapshot)
    state = WeightState(model)
    state.apply(Patch.from_bytes(result.patch.to_bytes()))
    try:
        assert "English" in greedy(request.text), result.diagnostics.to_dict()
        if method == "t-patcher":
            assert greedy(unrelated) == other_before
    finally:
        state.restore([])  # the rollback to the base
    assert neurons_of(model.get_submodule(next(iter(result.patch.neurons)))) is None
    assert_same_weights(model, snapshot)
    assert torch.equal(_logits(editor, request.text), base_logits)
    assert greedy(request.text) == before


SERVICE_FACTS = [
    ("The mother tongue of {} is", "Danielle Darrieux", "English"),
    ("{} plays the position of", "Ricky Rubio", "goalkeeper"),
    ("The capital of {} is", "Atlantis", "Paris"),
]


def test_t_patcher_neurons_are_served_rolled_back_rebased_and_replayed(tiny_settings):
    """Through the engine on a tiny GPT-2: GRACE, then T-Patcher, then ROME. The neurons
    change no weight yet /generate says the target; they join the checksum, survive a
    restart (rebuilt from the ledger), leave with a rollback and come back with a rollback
    forward; a subtraction is refused, a rebase recomputes the later edit without them."""
    from .service_support import post_edit, running_app, wait_job

    settings = tiny_settings()
    grace_fact, fact, rome_fact = SERVICE_FACTS[2], SERVICE_FACTS[0], SERVICE_FACTS[1]
    prompt = fact[0].format(fact[1])

    def say(client) -> str:
        body = {"inputs": prompt, "parameters": {"max_new_tokens": 1}}
        return client.post("/v1/generate", json=body).json()["generated_text"]

    def edit(client, one, method, hparams=None) -> dict:
        accepted = post_edit(client, *one, method=method, hparams=hparams or {})
        job = wait_job(client, accepted["job_id"])
        assert job["status"] == "applied", job
        return client.get(f"/v1/edits/{accepted['edit_ids'][0]}").json()

    with running_app(settings) as client:
        unedited = say(client)
        edit(client, grace_fact, "grace", {"lr": 0.5})  # a codebook the neurons must respect
        before = client.get("/v1/model").json()
        patched = edit(client, fact, "t-patcher")
        assert patched["diagnostics"]["extra"]["neurons"] == 1
        model = client.get("/v1/model").json()
        assert model["checksum"] != before["checksum"] and model["edited_parameters"] == []
        edited_version, edited = model["version"], say(client)
        assert edited.strip() == "English" and edited != unedited
        subtract = client.post(f"/v1/edits/{patched['id']}/revert", json={"mode": "subtract"})
        assert subtract.status_code == 422 and subtract.json()["field"] == "mode"
        edit(client, rome_fact, "rome", {"steps": 10})  # weights below the neurons
        assert say(client) == edited
        head = client.get("/v1/model").json()

    with running_app(settings) as client:  # replayed from the ledger: same neurons, same sum
        assert client.get("/v1/model").json()["checksum"] == head["checksum"]
        assert say(client) == edited
        rolled = client.post("/v1/rollback", json={"to_version": 1}).json()
        assert rolled["status"] == "applied"
        assert client.get("/v1/model").json()["checksum"] == before["checksum"]
        assert say(client) == unedited
        forward = client.post("/v1/rollback", json={"to_version": edited_version}).json()
        assert forward["status"] == "applied" and say(client) == edited
        reply = client.post(f"/v1/edits/{patched['id']}/revert", json={"mode": "rebase"})
        assert reply.status_code == 200 and reply.json()["status"] == "applied", reply.json()
        assert not client.get(f"/v1/edits/{patched['id']}").json()["live"]
        assert say(client) == unedited
        rebased = client.get("/v1/model").json()

    with running_app(settings) as client:
        assert client.get("/v1/model").json()["checksum"] == rebased["checksum"]
        assert say(client) == unedited
