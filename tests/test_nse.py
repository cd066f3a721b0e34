"""NSE's three mechanisms on a small model: neuron selection by activation, an update that
touches only the selected neurons, and target values computed on the rewound weights."""

from __future__ import annotations

import pytest
import torch

from editors import EditRequest, apply_patch, revert_patch
from editors.core.answers import target_probabilities
from editors.core.history import rewound
from editors.core.keys import residual_at_subject
from editors.core.updates import neurons_carrying
from editors.core.values import ValueOptions, optimise_residual_targets
from editors.datasets import counterfact_request
from editors.errors import InvalidValueError
from editors.nse import NSEHyperParams
from editors.patch import FactoredDelta, Patch
from editors.tokens import locate

from .conftest import assert_same_weights, counterfact, weights_snapshot

FAST = {"steps": 10, "prefixes": 0, "layers": [1, 2]}
FIRST = EditRequest("The mother tongue of {} is", "Danielle Darrieux", "English")
SECOND = EditRequest("{} plays the position of", "Ricky Rubio", "goalkeeper")


def test_the_selected_neurons_are_the_fewest_that_carry_the_share():
    keys = torch.tensor([[0.1, -0.1], [5.0, 3.0], [-2.0, -1.0], [0.5, 0.2], [0.0, 0.1]])
    # |activation| per neuron: 0.2, 8.0, 3.0, 0.7, 0.1 of 12.0 in all
    assert neurons_carrying(keys, 0.5).tolist() == [1]
    assert neurons_carrying(keys, 0.9).tolist() == [1, 2]  # 11.0 >= 10.8
    assert neurons_carrying(keys, 1.0).tolist() == [0, 1, 2, 3, 4]


@pytest.fixture(scope="module")
def editor(tiny_llama_editor_factory):
    return tiny_llama_editor_factory()


def test_an_nse_edit_changes_only_the_selected_neurons_and_reverts_exactly(editor):
    snapshot = weights_snapshot(editor.model)
    result = editor.compute([FIRST], "nse", {**FAST, "neuron_share": 0.5})
    assert_same_weights(editor.model, snapshot)  # computing leaves the model alone
    assert result.diagnostics.prob_after[0] > result.diagnostics.prob_before[0]
    assert sorted(result.patch.keys) == [1, 2] and result.patch.keys[1].shape[1] == 1
    for layer in (1, 2):
        delta = result.patch.deltas[editor.spec.weight_name(layer)]
        assert isinstance(delta, FactoredDelta)
        touched = int((delta.dense().abs().sum(0) > 0).sum())  # columns = MLP neurons
        width = delta.right.shape[0]
        assert 0 < touched < width / 2, (layer, touched, width)
    applied = apply_patch(editor.model, result.patch)
    revert_patch(editor.model, applied)
    assert_same_weights(editor.model, snapshot)


def test_targets_come_from_the_rewound_weights_and_earlier_keys_are_protected(editor):
    snapshot = weights_snapshot(editor.model)
    first = editor.compute([FIRST], "nse", FAST)
    on_base = editor.compute([SECOND], "nse", FAST)
    applied = apply_patch(editor.model, first.patch)
    try:
        with rewound(editor.model, [first.patch]):
            rewound_weights = weights_snapshot(editor.model)
        after = editor.compute([SECOND], "nse", FAST, history=[first.patch])
        unrewound = editor.compute(
            [SECOND], "nse", {**FAST, "rewind": False}, history=[first.patch]
        )
    finally:
        revert_patch(editor.model, applied)
    assert_same_weights(editor.model, snapshot)
    for name, value in rewound_weights.items():  # rewinding gives the weights before
        assert torch.allclose(value, snapshot[name], atol=1e-6), name
    # the target loss is optimised on the rewound (= unedited) weights: same curve as alone
    assert after.diagnostics.losses == pytest.approx(on_base.diagnostics.losses, rel=1e-4)
    # without rewinding they are optimised on the edited weights: another start
    assert unrewound.diagnostics.losses[0] != pytest.approx(on_base.diagnostics.losses[0])
    key = first.patch.keys[2].double()
    name = editor.spec.weight_name(2)
    moved_alone = torch.linalg.norm(on_base.patch.deltas[name].dense().double() @ key)
    moved_after = torch.linalg.norm(after.patch.deltas[name].dense().double() @ key)
    assert moved_after < moved_alone


def _p_target(editor, request) -> float:
    """P(target) of `request` on the editor's current weights."""
    return target_probabilities(editor.model, editor.tok, [request], [""])[0]


def test_the_landing_scorer_agrees_with_the_value_optimisations_first_look(editor):
    """The landing check scores P(target) with one plain forward pass; it must be the
    figure the value optimisation starts from (geometric mean over the contexts)."""
    prefixes = ["", "Here is a fact. ", "Yesterday I read that "]
    requests = [FIRST, SECOND]
    look = optimise_residual_targets(
        editor.model, editor.tok, editor.spec, requests, prefixes, 2, ValueOptions(steps=1)
    )
    scored = target_probabilities(editor.model, editor.tok, requests, prefixes)
    assert scored == pytest.approx(look.prob_before, rel=1e-4)
    alone = target_probabilities(editor.model, editor.tok, [SECOND], prefixes)
    assert alone[0] == pytest.approx(scored[1], rel=1e-4)  # rows do not mix


def test_the_landing_check_retargets_a_request_that_missed_on_the_edited_weights(editor):
    """With the bar above what the rewound target reaches on weights carrying an earlier
    edit, the request gets a target on the edited weights and sweeps of its own: it ends
    more likely to say the new answer than without the check, its keys are still kept for
    the history, and computing leaves the model alone."""
    snapshot = weights_snapshot(editor.model)
    first = editor.compute([FIRST], "nse", FAST)
    applied = apply_patch(editor.model, first.patch)
    try:
        plain = editor.compute([SECOND], "nse", FAST, history=[first.patch])
        checked = editor.compute(
            [SECOND], "nse", {**FAST, "landing_prob": 0.999}, history=[first.patch]
        )
        probs = {}
        for name, result in (("plain", plain), ("checked", checked)):
            record = apply_patch(editor.model, result.patch)
            probs[name] = _p_target(editor, SECOND)
            revert_patch(editor.model, record)
    finally:
        revert_patch(editor.model, applied)
    assert_same_weights(editor.model, snapshot)
    assert "landing_missed" not in plain.diagnostics.extra  # off by default
    assert checked.diagnostics.extra["landing_missed"] == [0]
    assert probs["plain"] < 0.999
    assert probs["checked"] > probs["plain"], probs
    assert sorted(checked.patch.keys) == [1, 2] and checked.patch.keys[2].shape[1] == 1
    assert checked.diagnostics.seconds["landing"] > 0


def _p_target_with_top_output(editor, request, layer: int, z: torch.Tensor) -> float:
    """P(target) of `request` with block `layer`'s output at the subject set to `z`."""
    lookup = locate(editor.tok, "", request.prompt, request.subject, None).lookup
    block = editor.model.get_submodule(editor.spec.layer_path(layer))

    def place(_module, _args, output):
        hidden = (output[0] if isinstance(output, tuple) else output).clone()
        hidden[0, lookup] = z.to(hidden.dtype)
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    handle = block.register_forward_hook(place)
    try:
        return _p_target(editor, request)
    finally:
        handle.remove()


@pytest.mark.slow
def test_an_edited_context_target_starts_at_the_rewound_subject_and_reports_the_edited_weights(
    smollm2_editor,
):
    """edited_context, on SmolLM2 under a history that moves every token's state: the
    target is anchored where the rewound weights put the subject, but sought with every
    other token as the edited weights give it, so what its optimisation reports is what the
    edited weights say with it placed at the subject."""
    editor = smollm2_editor
    model, tok, spec = editor.model, editor.tok, editor.spec
    name, top = spec.weight_name(3), 9
    weight = editor.model.get_parameter(name).detach()
    generator = torch.Generator().manual_seed(0)
    noise = torch.randn(weight.shape, generator=generator) * weight.float().std() * 0.3
    history = [Patch("noise", {name: noise.to(weight.dtype)})]  # moves every token's state
    options = ValueOptions(steps=10, lr=2.0, stop_nll=0.0, clamp_norm_factor=0.75)
    snapshot = weights_snapshot(model)
    applied = apply_patch(model, history[0])
    try:
        with rewound(model, history):
            plain = optimise_residual_targets(model, tok, spec, [SECOND], [""], top, options)
        anchored = optimise_residual_targets(
            model, tok, spec, [SECOND], [""], top, options, anchor=lambda: rewound(model, history)
        )
        here = residual_at_subject(model, tok, spec, [SECOND], top)
        z = (anchored.start + anchored.delta.detach())[0]
        said = _p_target_with_top_output(editor, SECOND, top, z)
    finally:
        revert_patch(model, applied)
    assert_same_weights(model, snapshot)
    assert plain.offset is None
    assert not torch.allclose(plain.start, here, atol=1e-3)  # the history moved the subject
    assert torch.allclose(anchored.start, plain.start, atol=1e-4)
    assert torch.allclose(anchored.offset, plain.start - here, atol=1e-3)
    assert said == pytest.approx(anchored.prob_after[0], rel=1e-3)


@pytest.mark.slow
def test_a_landing_target_probability_retargets_only_as_far_as_it_asks(smollm2_editor):
    """On SmolLM2, after an earlier edit: a request the batch edit leaves below the bar is
    retargeted, and a retarget that stops at a lower probability lands above the bar too,
    with a smaller weight change than one that goes to the value options' stop."""
    editor = smollm2_editor
    # the settings this was measured with, pinned so that tuning the defaults leaves it be
    base = {"prefixes": 0, "mom2_update_weight": 15000.0, "clamp_norm_factor": 0.65}
    base |= {"iterations": 3, "tolerance": 0.1, "history_weight": 1.0}
    earlier = [FIRST, counterfact_request(counterfact("train", 1, start=60)[0])]
    first = editor.compute(earlier, "nse", base)
    second = [counterfact_request(r) for r in counterfact("train", 3, start=61)]
    checks = {
        "full": {**base, "landing_prob": 0.6},
        "part": {**base, "landing_prob": 0.6, "landing_target_prob": 0.7},
    }
    snapshot = weights_snapshot(editor.model)
    applied = apply_patch(editor.model, first.patch)
    try:
        results, landed = {}, {}
        for name, check in checks.items():
            results[name] = editor.compute(second, "nse", check, history=[first.patch])
            record = apply_patch(editor.model, results[name].patch)
            landed[name] = target_probabilities(editor.model, editor.tok, second, [""])
            revert_patch(editor.model, record)
    finally:
        revert_patch(editor.model, applied)
    assert_same_weights(editor.model, snapshot)
    assert results["full"].diagnostics.extra["landing_missed"] == [0]
    assert results["part"].diagnostics.extra["landing_missed"] == [0]
    assert min(landed["part"]) > 0.6 and min(landed["full"]) > 0.6, landed
    moved = {name: sum(result.diagnostics.delta_norms.values()) for name, result in results.items()}
    assert moved["part"] < moved["full"], moved


def test_bad_nse_hyperparameters_are_named():
    for overrides, field in (
        ({"neuron_share": 0.0}, "neuron_share"),
        ({"neuron_share": 1.5}, "neuron_share"),
        ({"iterations": 0}, "iterations"),
        ({"layer_share_cap": -1.0}, "layer_share_cap"),
        ({"tolerance": 1.0}, "tolerance"),
        ({"mom2_update_weight": -1.0}, "mom2_update_weight"),
        ({"landing_prob": 1.0}, "landing_prob"),
        ({"landing_prob": -0.1}, "landing_prob"),
        ({"landing_prob": 0.5, "landing_target_prob": 0.4}, "landing_target_prob"),
        ({"landing_target_prob": 1.0}, "landing_target_prob"),
        ({"edited_context": True, "rewind": False}, "edited_context"),
    ):
        with pytest.raises(InvalidValueError) as caught:
            NSEHyperParams(**overrides)
        assert caught.value.field == field
