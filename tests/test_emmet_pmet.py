"""EMMET and PMET: the closed form and the target optimisation each adds to the shared core,
and on a tiny model of every family an edit that applies, reverts exactly, replays from its
bytes bit for bit, can be subtracted, and is the same bytes each time it is computed."""

from __future__ import annotations

import pytest
import torch

from editors import EditRequest, Patch, apply_patch, revert_patch
from editors.core.keys import compute_keys, residual_at_subject
from editors.core.spread import Sweeps, sweep_over_layers
from editors.core.updates import equality_constrained_update, least_squares_update, rank_one_update
from editors.core.values import ValueOptions, _build_rows, _UpperStack, optimise_residual_targets
from editors.editor import Editor, corpus_statistics
from editors.emmet import EMMETHyperParams
from editors.errors import InvalidValueError
from editors.methods import METHODS
from editors.metrics import evaluate
from editors.pmet import PMETHyperParams, attention_output_path
from editors.tiny import TINY_CONFIGS, tiny_random_model
from editors.tracing import hidden_of

from .conftest import assert_same_weights, weights_snapshot

FAMILIES = sorted(TINY_CONFIGS)
REQUEST = EditRequest("The mother tongue of {} is", "Danielle Darrieux", "English")
SECOND = EditRequest("{} plays the position of", "Ricky Rubio", "goalkeeper")
FAST = {"steps": 4, "prefixes": 1, "prefix_length": 4}
# the bare prompt alone and one sweep; the tiny models' C is far smaller than a real model's:
# PMET's lam 15000 would leave next to no edit
OVERRIDES = {
    "emmet": {**FAST, "prefixes": 0, "iterations": 1},
    "pmet": {**FAST, "prefixes": 0, "iterations": 1, "mom2_update_weight": 10.0},
}


def _system(seed: int, d_in: int = 24, d_out: int = 12, n: int = 3):
    g = torch.Generator().manual_seed(seed)
    basis = torch.randn(d_in, d_in, generator=g, dtype=torch.float64)
    c = basis @ basis.T / d_in + 0.1 * torch.eye(d_in, dtype=torch.float64)
    keys = torch.randn(d_in, n, generator=g, dtype=torch.float64)
    residuals = torch.randn(d_out, n, generator=g, dtype=torch.float64)
    return c, keys, residuals, g


def test_emmet_maps_every_key_exactly_onto_its_new_value():
    c, keys, residuals, _ = _system(0)
    a, b = equality_constrained_update(c, keys, residuals, lam=0.0)
    torch.testing.assert_close(a @ b.T @ keys, residuals, rtol=1e-9, atol=1e-9)
    # lam_e shrinks what the keys receive, as a ridge on K^T C^-1 K
    a, b = equality_constrained_update(c, keys, residuals, lam=10.0)
    assert torch.linalg.norm(a @ b.T @ keys) < torch.linalg.norm(residuals)


def test_emmet_moves_the_preserved_keys_least_among_updates_that_meet_the_constraints():
    c, keys, residuals, g = _system(1)
    a, b = equality_constrained_update(c, keys, residuals, lam=0.0)
    delta = a @ b.T

    def damage(d: torch.Tensor) -> float:  # tr(D C D^T): the preserved keys' output change
        return float(torch.trace(d @ c @ d.T))

    # any other update meeting D K = R differs from it by E with E K = 0
    free = torch.eye(keys.shape[0], dtype=torch.float64) - keys @ torch.linalg.pinv(keys)
    for _ in range(5):
        other = delta + 1e-2 * torch.randn(delta.shape, generator=g, dtype=torch.float64) @ free
        torch.testing.assert_close(other @ keys, residuals, rtol=1e-8, atol=1e-8)
        assert damage(delta) < damage(other)
    # and MEMIT's least squares (lam C + K K^T) trades the constraints for less damage
    a_ls, b_ls = least_squares_update(c, keys, residuals, lam=1.0)
    assert damage(a_ls @ b_ls.T) < damage(delta)


def test_emmet_of_one_key_is_roms_rank_one_update():
    c, keys, residuals, _ = _system(2, n=1)
    a, b = equality_constrained_update(c, keys, residuals, lam=0.0)
    left, right = rank_one_update(torch.linalg.inv(c), keys[:, 0], residuals[:, 0], keys[:, 0])
    torch.testing.assert_close(a @ b.T, left @ right.T, rtol=1e-9, atol=1e-12)


@pytest.fixture(scope="module")
def editors_by_family(gpt2_tok, corpus_file, tmp_path_factory):
    cache = tmp_path_factory.mktemp("stats")
    out = {}
    for family in FAMILIES:
        model = tiny_random_model(family, len(gpt2_tok))
        stats = corpus_statistics(model, gpt2_tok, cache, corpus_file, samples=500)
        out[family] = Editor(model, gpt2_tok, stats)
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_the_component_stack_matches_a_full_forward_pass(editors_by_family, family):
    """PMET's vectors at the attention and MLP outputs of block `layer`: the optimisation's
    shortcut (block `layer` run from its cached input, the prefix in a KV cache) gives the
    hidden states a full forward pass with the same vectors gives."""
    editor = editors_by_family[family]
    model, tok, spec = editor.model, editor.tok, editor.spec
    prefixes = ["", "Once upon a time, in a land far away. "]
    rows = _build_rows(tok, [REQUEST], prefixes, torch.device("cpu"))
    for layer in (0, 2):
        paths = (attention_output_path(spec, layer), spec.mlp_out_path(layer))
        stack = _UpperStack(model, spec, layer, rows, components=paths)
        g = torch.Generator().manual_seed(layer)
        parts = [torch.randn(model.config.hidden_size, generator=g) * 0.5 for _ in paths]
        fast = stack.run(torch.cat(parts).expand(rows.ids.shape[0], -1))
        for row in range(rows.ids.shape[0]):
            lookup = int(rows.past_mask[row].sum())
            length = int(rows.mask[row].sum())
            ids = torch.cat([rows.past_ids[row, :lookup], rows.ids[row, :length]])[None]

            def bump(_m, _a, out, part, lookup=lookup):
                out = hidden_of(out).clone()
                out[0, lookup] += part
                return out

            handles = [
                model.get_submodule(path).register_forward_hook(
                    lambda m, a, o, part=part: bump(m, a, o, part)
                )
                for path, part in zip(paths, parts, strict=True)
            ]
            try:
                full = model.base_model(input_ids=ids).last_hidden_state[0, lookup:]
            finally:
                for handle in handles:
                    handle.remove()
            torch.testing.assert_close(fast[row, :length], full, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", ["emmet", "pmet"])
def test_edit_applies_replays_reverts_and_is_deterministic(editors_by_family, family, method):
    editor = editors_by_family[family]
    model, tok, spec = editor.model, editor.tok, editor.spec
    ids = tok(REQUEST.text, return_tensors="pt")
    before_logits = model(**ids).logits
    snapshot = weights_snapshot(model)

    result = editor.compute([REQUEST], method, OVERRIDES[method])
    assert_same_weights(model, snapshot)  # computing a patch changes nothing
    layers = result.diagnostics.layers
    patch = result.patch
    assert set(patch.deltas) == {spec.weight_name(layer) for layer in layers}  # MLP weights only
    for name, delta in patch.deltas.items():
        assert delta.dense().shape == model.get_parameter(name).shape
        assert delta.rank == 1  # low rank: one request's key, one sweep
    assert result.diagnostics.prob_after[0] > result.diagnostics.prob_before[0]
    again = editor.compute([REQUEST], method, OVERRIDES[method])
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
    applied = apply_patch(model, replayed)  # a replay from the ledger's bytes
    assert_same_weights(model, edited)
    revert_patch(model, applied)
    assert_same_weights(model, snapshot)


def test_each_emmet_layer_delivers_its_share_exactly_at_the_keys(editors_by_family):
    """EMMET's constraint, end to end: at the first edited layer (whose keys no other edit
    changes) the update's right factor B meets B^T K = I for the requests' keys K."""
    editor = editors_by_family["llama"]
    options = {**FAST, "layers": [1, 2], "emmet_lambda": 0.0}
    result = editor.compute([REQUEST, SECOND], "emmet", options)
    prefixes = result.diagnostics.prefixes
    keys = compute_keys(editor.model, editor.tok, editor.spec, [REQUEST, SECOND], prefixes, [1])
    right = result.patch.deltas[editor.spec.weight_name(1)].right.double()[:, :2]  # first sweep
    product = right.T @ keys[1].mean.double().T
    torch.testing.assert_close(product, torch.eye(2, dtype=torch.float64), rtol=0, atol=1e-4)


def test_pmet_writes_the_mlp_target_at_the_top_mlp_output(editors_by_family):
    """PMET's z is the top MLP's output: a one-layer sweep with almost no lam C puts the
    top MLP's output at the subject on z, while the attention vector is left out."""
    editor = editors_by_family["llama"]
    model, tok, spec, stats = editor.model, editor.tok, editor.spec, editor.stats
    top = 2
    paths = (attention_output_path(spec, top), spec.mlp_out_path(top))
    options = ValueOptions(steps=6, lr=0.5)
    targets = optimise_residual_targets(
        model, tok, spec, [REQUEST], [""], top, options, components=paths
    )
    width = model.config.hidden_size
    assert float(targets.delta[0, :width].norm()) > 0  # the attention vector was sought
    z = (targets.start + targets.delta)[:, width:]
    torch.testing.assert_close(
        targets.start[:, width:], residual_at_subject(model, tok, spec, [REQUEST], top, paths[1])
    )

    def solve(layer, keys, change):
        return least_squares_update(stats.second_moment(layer), keys, change, 1e-6)

    sweeps = Sweeps(1, 0.0, mlp_target=True, share_power=0.5)
    swept = sweep_over_layers(model, tok, spec, [REQUEST], [""], [top], z, solve, "pmet", sweeps)
    applied = apply_patch(model, swept.patch)
    try:
        reached = residual_at_subject(model, tok, spec, [REQUEST], top, paths[1])
    finally:
        revert_patch(model, applied)
    torch.testing.assert_close(reached, z, rtol=1e-3, atol=1e-3)
    assert swept.left[0] < 1e-2


def test_the_methods_are_registered_with_their_statistics_layers():
    for name, hparams_type in (("emmet", EMMETHyperParams), ("pmet", PMETHyperParams)):
        method = METHODS[name]
        assert method.hparams_type is hparams_type and method.needs_statistics
        assert method.subtractable and method.writes_weights and not method.uses_history
        llama = method.hparams("llama")
        assert method.statistics_layers(llama, 30) == llama.resolved_layers(30)


def test_bad_hyperparameters_are_named():
    for kind, overrides, field in (
        (EMMETHyperParams, {"emmet_lambda": -1.0}, "emmet_lambda"),
        (EMMETHyperParams, {"mom2_update_weight": 0.0}, "mom2_update_weight"),
        (PMETHyperParams, {"share_power": 0.0}, "share_power"),
        (PMETHyperParams, {"share_power": 1.5}, "share_power"),
        (PMETHyperParams, {"iterations": 0}, "iterations"),
    ):
        with pytest.raises(InvalidValueError) as caught:
            kind(**overrides)
        assert caught.value.field == field


@pytest.mark.slow
@pytest.mark.parametrize("method", ["emmet", "pmet"])
def test_smollm2_says_the_new_target_and_comes_back(smollm2_editor, method):
    """With the Llama-family defaults, one edit of SmolLM2 makes the new target win over
    the true one and be what greedy decoding says; the rollback is exact."""
    editor = smollm2_editor
    request = EditRequest(
        "The mother tongue of {} is", "Danielle Darrieux", "English", target_true="French"
    )
    snapshot = weights_snapshot(editor.model)
    result = editor.compute([request], method)
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
