"""UltraEdit: the ridge closed form, the lifelong normaliser (exact running moments, kept
in the patches and rebuilt from the chain), and on a tiny model of every family an edit
that applies, reverts exactly, replays from its bytes bit for bit, can be subtracted, and is
the same bytes each time it is computed."""

from __future__ import annotations

import pytest
import torch

from editors import EditRequest, Patch, apply_patch, revert_patch
from editors.core.updates import least_squares_update, ridge_update
from editors.editor import Editor
from editors.errors import InvalidValueError, UnknownHyperparameterError
from editors.methods import METHODS
from editors.metrics import evaluate
from editors.tiny import TINY_CONFIGS, tiny_random_model
from editors.ultraedit import EPS, Moments, UltraEditHyperParams, edit_features, running_moments

from .conftest import assert_same_weights, weights_snapshot

FAMILIES = sorted(TINY_CONFIGS)
FIRST = EditRequest("The mother tongue of {} is", "Danielle Darrieux", "English")
SECOND = EditRequest("{} plays the position of", "Ricky Rubio", "goalkeeper")
TINY = {"lr": 1e-2}  # the tiny random models' keys are far smaller than a real model's


def test_the_update_is_the_ridge_regression_of_the_values_on_the_keys():
    g = torch.Generator().manual_seed(0)
    keys = torch.randn(24, 3, generator=g, dtype=torch.float64)
    values = torch.randn(12, 3, generator=g, dtype=torch.float64)
    a, b = ridge_update(keys, values, lam=0.5)
    eye = torch.eye(24, dtype=torch.float64)
    direct = values @ keys.T @ torch.linalg.inv(keys @ keys.T + 0.5 * eye)
    torch.testing.assert_close(a @ b.T, direct, rtol=1e-9, atol=1e-12)
    # MEMIT's least squares with the identity in place of C is the same update
    a_ls, b_ls = least_squares_update(eye, keys, values, lam=0.5)
    torch.testing.assert_close(a @ b.T, a_ls @ b_ls.T, rtol=1e-9, atol=1e-12)
    # a vanishing ridge maps every key onto its value
    a, b = ridge_update(keys, values, lam=1e-12)
    torch.testing.assert_close(a @ b.T @ keys, values, rtol=1e-6, atol=1e-8)


def test_merged_moments_are_the_moments_of_every_row_and_of_the_prior():
    g = torch.Generator().manual_seed(1)
    batches = [torch.randn(n, 7, generator=g, dtype=torch.float64) * 3 + 1 for n in (1, 4, 2)]
    state = Moments.prior(2.0, 7)
    for batch in batches:
        state = state.merged(Moments.of(batch))
    every = torch.cat([torch.zeros(2, 7, dtype=torch.float64), *batches])
    assert state.count == every.shape[0]
    torch.testing.assert_close(state.mean, every.mean(0), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(state.std, every.std(0), rtol=1e-12, atol=1e-12)
    # no prior: the paper's normaliser, the first batch normalised by its own statistics
    alone = Moments.prior(0.0, 7).merged(Moments.of(batches[1]))
    torch.testing.assert_close(alone.std, batches[1].std(0), rtol=1e-12, atol=1e-12)
    # a lone first feature after one zero pseudo-feature: a sign step of 1/sqrt(2)
    lone = Moments.prior(1.0, 7).merged(Moments.of(batches[0]))
    torch.testing.assert_close(
        lone.normalise(batches[0]), batches[0].sign() / 2**0.5, rtol=1e-6, atol=1e-6
    )


def test_the_running_statistics_are_the_same_extended_or_folded_afresh():
    """running_moments continues its last fold when the history extends it; that must give
    the bits a fold from nothing gives, and a shorter history (after a rollback) must not
    reuse the longer one's."""
    generator = torch.Generator().manual_seed(3)
    patches = [
        Patch("ultraedit", {}, Moments.of(torch.randn(n, 5, generator=generator)).to_metadata(4))
        for n in (1, 3, 2, 2)
    ]
    every = [Moments.from_metadata(p.metadata, 4) for p in patches]
    running_moments(patches[:2], 4, 5, 1.0)
    extended = running_moments(patches, 4, 5, 1.0)
    copies = [Patch("ultraedit", {}, dict(p.metadata)) for p in patches]  # new objects
    afresh = running_moments(copies, 4, 5, 1.0)
    assert extended.count == afresh.count == 1 + 8
    assert torch.equal(extended.mean, afresh.mean) and torch.equal(extended.m2, afresh.m2)
    rolled_back = running_moments(patches[:1], 4, 5, 1.0)
    expected = Moments.prior(1.0, 5).merged(every[0])  # type: ignore[arg-type]
    assert rolled_back.count == 2 and torch.equal(rolled_back.mean, expected.mean)
    # a patch subtracted (its negation) or of another method, or another layer, adds nothing
    others = [patches[0].negated(), Patch("memit", {}, dict(patches[1].metadata))]
    assert running_moments(others, 4, 5, 1.0).count == 1
    assert running_moments(patches, 3, 5, 1.0).count == 1


@pytest.fixture(scope="module")
def editors_by_family(gpt2_tok):
    return {
        family: Editor(tiny_random_model(family, len(gpt2_tok)), gpt2_tok, None)
        for family in FAMILIES
    }


@pytest.mark.parametrize("family", FAMILIES)
def test_edit_applies_replays_reverts_and_is_deterministic(editors_by_family, family):
    editor = editors_by_family[family]
    model, tok, spec = editor.model, editor.tok, editor.spec
    ids = tok(FIRST.text, return_tensors="pt")
    before_logits = model(**ids).logits
    snapshot = weights_snapshot(model)

    result = editor.compute([FIRST], "ultraedit", TINY)
    assert_same_weights(model, snapshot)  # computing a patch changes nothing
    layers = result.diagnostics.layers
    assert layers == [2, 3]  # the default depth on four layers
    patch = result.patch
    assert set(patch.deltas) == {spec.weight_name(layer) for layer in layers}  # MLP weights only
    positions = len(tok(FIRST.target, add_special_tokens=False)["input_ids"])
    assert result.diagnostics.extra["positions"] == positions
    for name, delta in patch.deltas.items():
        assert delta.dense().shape == model.get_parameter(name).shape
        assert delta.rank == positions  # one key per position that predicts a target token
    assert result.diagnostics.prob_after[0] > result.diagnostics.prob_before[0]
    again = editor.compute([FIRST], "ultraedit", TINY)
    assert again.patch.sha256 == patch.sha256  # deterministic patch bytes

    applied = apply_patch(model, patch)
    edited = weights_snapshot(model)
    assert not torch.allclose(before_logits, model(**ids).logits)
    # subtract (the revert that appends a version): back to the base up to rounding
    subtracted = apply_patch(model, patch.negated())
    for name in patch.deltas:
        torch.testing.assert_close(model.get_parameter(name), snapshot[name], rtol=0, atol=1e-6)
    revert_patch(model, subtracted)
    revert_patch(model, applied)
    assert_same_weights(model, snapshot)  # rollback is exact
    assert torch.equal(model(**ids).logits, before_logits)

    replayed = Patch.from_bytes(patch.to_bytes(), expected_sha256=patch.sha256)
    assert replayed.metadata == patch.metadata  # the normaliser's moments come back whole
    applied = apply_patch(model, replayed)  # a replay from the ledger's bytes
    assert_same_weights(model, edited)
    revert_patch(model, applied)
    assert_same_weights(model, snapshot)


def test_the_normaliser_follows_the_chain(editors_by_family):
    """A second edit on top of the first is normalised by the moments of every feature the
    chain has seen (the prior's zeros, the first edit's, its own), read from the history's
    patches, also from their bytes; without the history it is another update."""
    editor = editors_by_family["llama"]
    model, tok, spec = editor.model, editor.tok, editor.spec
    hparams = UltraEditHyperParams(**TINY)
    layers = [2, 3]
    snapshot = weights_snapshot(model)
    first = editor.compute([FIRST], "ultraedit", TINY)
    seen_first = edit_features(model, tok, spec, [FIRST], [""], layers)
    applied = apply_patch(model, first.patch)
    try:
        second = editor.compute([SECOND], "ultraedit", TINY, history=[first.patch])
        stored = Patch.from_bytes(first.patch.to_bytes())
        replayed = editor.compute([SECOND], "ultraedit", TINY, history=[stored])
        unrelated = Patch("memit", {}, {"normaliser.layer2.count": "5.0"})
        mixed = editor.compute([SECOND], "ultraedit", TINY, history=[unrelated, first.patch])
        fresh = editor.compute([SECOND], "ultraedit", TINY)
        seen_second = edit_features(model, tok, spec, [SECOND], [""], layers)
    finally:
        revert_patch(model, applied)
    assert_same_weights(model, snapshot)
    assert replayed.patch.sha256 == second.patch.sha256 == mixed.patch.sha256
    assert fresh.patch.sha256 != second.patch.sha256

    n_first, n_second = (seen[2].keys.shape[0] for seen in (seen_first, seen_second))
    counts = second.diagnostics.extra["normaliser_count"]
    assert counts == {str(layer): hparams.prior_count + n_first + n_second for layer in layers}
    for layer in layers:
        every = torch.cat(
            [
                torch.zeros(int(hparams.prior_count), seen_first[layer].joined.shape[1]),
                seen_first[layer].joined,
                seen_second[layer].joined,
            ]
        ).double()
        z_hat = (seen_second[layer].joined - every.mean(0)) / (every.std(0) + EPS)
        d_in = seen_second[layer].keys.shape[1]
        k_hat, g_hat = z_hat[:, :d_in], z_hat[:, d_in:]
        values = -hparams.lr * (k_hat**2).sum(1, keepdim=True) * g_hat  # [m, d_out]
        keys = seen_second[layer].keys  # [m, d_in], raw in the ridge
        eye = torch.eye(d_in, dtype=torch.float64)
        expected = values.T @ keys @ torch.linalg.inv(keys.T @ keys + hparams.ridge * eye)
        got = second.patch.deltas[spec.weight_name(layer)].dense().double()
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-7)
        # what the chain says is what the stored moments say
        state = running_moments([first.patch], layer, every.shape[1], hparams.prior_count)
        torch.testing.assert_close(state.mean, every[:-n_second].mean(0), rtol=1e-9, atol=1e-12)


def test_context_prefixes_add_positions(editors_by_family):
    editor = editors_by_family["llama"]
    one = editor.compute([FIRST], "ultraedit", TINY, prefixes=[""])
    two = editor.compute([FIRST], "ultraedit", TINY, prefixes=["", "Once upon a time. "])
    assert two.diagnostics.extra["positions"] == 2 * one.diagnostics.extra["positions"]
    assert two.diagnostics.prefixes == ["", "Once upon a time. "]


def test_the_method_is_registered_without_statistics_and_with_history():
    method = METHODS["ultraedit"]
    assert method.hparams_type is UltraEditHyperParams
    assert method.uses_history and not method.needs_statistics
    assert method.subtractable and method.writes_weights
    llama = method.hparams("llama")
    assert method.statistics_layers(llama, 30) == []
    assert llama.edited_layers(30) == [26, 27]


def test_bad_hyperparameters_are_named():
    for overrides, field in (
        ({"lr": 0.0}, "lr"),
        ({"ridge": -1.0}, "ridge"),
        ({"prior_count": -1.0}, "prior_count"),
        ({"span": 0}, "span"),
        ({"prefixes": -1}, "prefixes"),
        ({"prefix_length": 0}, "prefix_length"),
        ({"last_layer_fraction": 1.5}, "last_layer_fraction"),
        ({"layers": (3, 1)}, "layers"),
    ):
        with pytest.raises(InvalidValueError) as caught:
            UltraEditHyperParams(**overrides)
        assert caught.value.field == field
    method = METHODS["ultraedit"]
    with pytest.raises(InvalidValueError) as caught:
        method.hparams("llama", {"lr": "fast"})
    assert caught.value.field == "lr"
    with pytest.raises(UnknownHyperparameterError) as unknown:
        method.hparams("llama", {"mom2_update_weight": 1.0})
    assert unknown.value.field == "mom2_update_weight"


@pytest.mark.slow
def test_smollm2_says_the_new_target_and_comes_back(smollm2_editor):
    """With the Llama-family defaults, one edit of SmolLM2 makes the new target win over
    the true one and be what greedy decoding says; the rollback is exact."""
    editor = smollm2_editor
    request = EditRequest(
        "The mother tongue of {} is", "Danielle Darrieux", "English", target_true="French"
    )
    snapshot = weights_snapshot(editor.model)
    result = editor.compute([request], "ultraedit")
    applied = apply_patch(editor.model, result.patch)
    try:
        scores = evaluate(editor.model, editor.tok, [request], free_generation=False)
        ids = editor.tok(request.text, return_tensors="pt")
        with torch.no_grad():
            out = editor.model.generate(
                **ids, max_new_tokens=3, do_sample=False, pad_token_id=editor.tok.pad_token_id
            )
        said = editor.tok.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
    finally:
        revert_patch(editor.model, applied)
    assert_same_weights(editor.model, snapshot)
    assert scores["efficacy"] == 1.0 and scores["reliability"] == 1.0
    assert said.strip().startswith("English"), said
