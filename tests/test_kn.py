"""KN (knowledge neurons) on tiny models of every family: the integrated gradients are
complete, the refining keeps the shared neurons, and an edit changes only the selected
neurons' value vectors, replays from its bytes, reverts exactly and is deterministic."""

from __future__ import annotations

import pytest
import torch

from editors import EditRequest, apply_patch, revert_patch
from editors.editor import Editor
from editors.errors import InvalidValueError, LayerOutOfRangeError
from editors.kn import KNHyperParams, integrated_gradients, select_neurons
from editors.methods import METHODS
from editors.model_spec import get_module
from editors.patch import FactoredDelta, Patch, dense_of
from editors.tiny import TINY_CONFIGS, tiny_random_model

from .conftest import assert_same_weights, weights_snapshot

FAMILIES = sorted(TINY_CONFIGS)
REQUEST = EditRequest(
    prompt="The mother tongue of {} is",
    subject="Danielle Darrieux",
    target_new="English",
    target_true="French",
)
SECOND = EditRequest(prompt="{} plays the position of", subject="Ricky Rubio", target_new="goalie")
FAST = {"steps": 4, "prefixes": 1, "prefix_length": 4, "max_neurons": 6, "percentage": 0.5}


@pytest.fixture(scope="module")
def editors_by_family(gpt2_tok):
    # KN reads no statistics
    return {f: Editor(tiny_random_model(f, len(gpt2_tok)), gpt2_tok, None) for f in FAMILIES}


def _neuron_mask(editor: Editor, layer: int, indices: list[int]) -> torch.Tensor:
    """True at the value-vector entries of `indices` in the layer's weight, in its layout."""
    weight = editor.model.get_parameter(editor.spec.weight_name(layer))
    mask = torch.zeros_like(weight, dtype=torch.bool)
    if editor.spec.conv1d:  # [d_ff, d_model]: a neuron's value vector is its row
        mask[indices, :] = True
    else:  # [d_model, d_ff]: its column
        mask[:, indices] = True
    return mask


@pytest.mark.parametrize("family", FAMILIES)
def test_kn_changes_only_the_selected_value_vectors_replays_and_reverts_exactly(
    editors_by_family, family
):
    editor = editors_by_family[family]
    model, spec = editor.model, editor.spec
    snapshot = weights_snapshot(model)
    ids = editor.tok(REQUEST.text, return_tensors="pt")
    before_logits = model(**ids).logits

    result = editor.compute([REQUEST], "kn", FAST)
    assert_same_weights(model, snapshot)  # computing a patch changes nothing
    patch, diagnostics = result.patch, result.diagnostics
    (neurons,) = diagnostics.extra["neurons"]
    assert 1 <= len(neurons) <= FAST["max_neurons"]
    assert diagnostics.extra["old_answer"] == [" French"]
    assert set(patch.deltas) == {spec.weight_name(layer) for layer in diagnostics.layers}
    assert diagnostics.layers == sorted({layer for layer, _ in neurons})
    for layer in diagnostics.layers:
        indices = [i for lay, i in neurons if lay == layer]
        delta = patch.deltas[spec.weight_name(layer)]
        assert isinstance(delta, FactoredDelta) and delta.rank == len(indices)  # compact
        dense = dense_of(delta)
        mask = _neuron_mask(editor, layer, indices)
        assert torch.count_nonzero(dense[~mask]) == 0  # an exact zero off the value vectors
        assert bool((dense[mask] != 0).any())

    applied = apply_patch(model, patch)
    for name, value in model.state_dict().items():
        changed = value != snapshot[name]
        if name in patch.deltas:
            layer = next(lay for lay in diagnostics.layers if spec.weight_name(lay) == name)
            indices = [i for lay, i in neurons if lay == layer]
            assert not changed[~_neuron_mask(editor, layer, indices)].any(), name
        else:
            assert not changed.any(), name
    edited = weights_snapshot(model)
    assert not torch.allclose(model(**ids).logits, before_logits)
    assert diagnostics.prob_after[0] > diagnostics.prob_before[0]
    revert_patch(model, applied)
    assert_same_weights(model, snapshot)
    assert torch.equal(model(**ids).logits, before_logits)

    # the ledger's bytes replay to the same weights, and the same request gives the same bytes
    replayed = Patch.from_bytes(patch.to_bytes(), expected_sha256=patch.sha256)
    applied = apply_patch(model, replayed)
    assert_same_weights(model, edited)
    revert_patch(model, applied)
    assert_same_weights(model, snapshot)
    again = editor.compute([REQUEST], "kn", FAST, prefixes=diagnostics.prefixes)
    assert again.patch.to_bytes() == patch.to_bytes()


def test_requests_are_edited_in_turn_and_the_greedy_answer_stands_in_for_target_true(
    editors_by_family,
):
    editor = editors_by_family["llama"]
    model, tok = editor.model, editor.tok
    snapshot = weights_snapshot(model)
    result = editor.compute([REQUEST, SECOND], "kn", FAST)
    assert_same_weights(model, snapshot)
    with torch.no_grad():
        greedy = model(**tok(SECOND.text, return_tensors="pt")).logits[0, -1].argmax()
    assert result.diagnostics.extra["old_answer"] == [" French", tok.decode([int(greedy)])]
    first, second = result.diagnostics.extra["neurons"]
    ranks = {}
    for layer, _ in first + second:
        ranks[layer] = ranks.get(layer, 0) + 1
    for layer, rank in ranks.items():  # the two edits' factors side by side
        assert result.patch.deltas[editor.spec.weight_name(layer)].rank == rank
    assert len(result.diagnostics.prob_after) == 2
    applied = apply_patch(model, result.patch)
    revert_patch(model, applied)
    assert_same_weights(model, snapshot)


@pytest.mark.parametrize("family", ["gpt2", "llama"])  # Conv1D and Linear layouts
def test_integrated_gradients_are_complete_and_padding_does_not_change_them(
    editors_by_family, family
):
    """IG's completeness: a layer's attributions sum to P(answer) minus P(answer) with that
    layer's activations at the last token zeroed (up to the Riemann error). Variants of
    different lengths share a left-padded batch; each gets what it gets alone."""
    editor = editors_by_family[family]
    model, tok, spec = editor.model, editor.tok, editor.spec
    texts = ["Once upon a time, far away. " + REQUEST.text, REQUEST.text]
    variants = [tok(t)["input_ids"] for t in texts]
    answer, layers = 1234, [0, 2, 3]
    together = integrated_gradients(model, spec, variants, answer, layers, 64)
    alone = integrated_gradients(model, spec, variants[1:], answer, layers, 64)
    torch.testing.assert_close(together.scores[1], alone.scores[0], rtol=1e-3, atol=1e-9)

    def prob(ids: list[int], zeroed: int | None = None) -> float:
        def zero(_m, args):
            x = args[0].clone()
            x[:, -1] = 0
            return (x,)

        module = get_module(model, spec.mlp_out_path(zeroed if zeroed is not None else 0))
        handle = module.register_forward_pre_hook(zero) if zeroed is not None else None
        try:
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([ids])).logits[0, -1].float()
        finally:
            if handle is not None:
                handle.remove()
        return float(torch.softmax(logits, -1)[answer])

    for v, ids in enumerate(variants):
        for row, layer in enumerate(layers):
            expected = prob(ids) - prob(ids, layer)
            total = float(together.scores[v, row].sum())
            assert total == pytest.approx(expected, rel=0.05, abs=1e-9)


def test_refining_keeps_neurons_coarse_in_enough_variants_largest_first():
    scores = torch.zeros(4, 2, 5)  # variants, layers, neurons
    scores[:, 0, 1] = 1.0  # the top neuron of every variant
    scores[:3, 1, 3] = 0.5  # coarse in 3 of 4
    scores[:1, 1, 0] = 0.9  # coarse in 1 of 4
    scores[:, 0, 4] = 0.1  # below 0.2 of the peak everywhere
    layers = [7, 9]
    assert select_neurons(scores, layers, 0.2, 0.5, 10) == ([(7, 1), (9, 3)], False)
    assert select_neurons(scores, layers, 0.2, 0.75, 10) == ([(7, 1), (9, 3)], False)
    assert select_neurons(scores, layers, 0.2, 1.0, 10) == ([(7, 1)], False)
    assert select_neurons(scores, layers, 0.2, 0.0, 10) == ([(7, 1), (9, 0), (9, 3)], False)
    assert select_neurons(scores, layers, 0.05, 0.75, 1) == ([(7, 1)], False)  # the cap
    negative = -torch.ones(2, 1, 3)  # no variant has a positive score: the top mean alone
    negative[:, 0, 2] = -0.5
    assert select_neurons(negative, [0], 0.2, 0.5, 10) == ([(0, 2)], True)


def test_kn_is_registered_without_statistics_and_checks_its_hyperparameters():
    method = METHODS["kn"]
    assert not method.needs_statistics
    hparams = method.hparams("llama")
    assert method.statistics_layers(hparams, 30) == []
    assert hparams.edited_layers(4) == [0, 1, 2, 3]
    assert method.hparams("gpt2", {"layers": [1, 3]}).edited_layers(4) == [1, 3]
    with pytest.raises(LayerOutOfRangeError):
        method.hparams("gpt2", {"layers": [4]}).edited_layers(4)
    for bad in (
        {"steps": 0},
        {"adaptive_threshold": 0},
        {"adaptive_threshold": 1.5},
        {"percentage": 1.2},
        {"max_neurons": 0},
        {"enhance": -1},
        {"layers": [2, 1]},
    ):
        with pytest.raises(InvalidValueError):
            KNHyperParams(**bad)
