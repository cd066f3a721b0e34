"""Every supported family, on a tiny random model: edits apply with the right shapes, change
the output, and revert bit-exactly; the optimisation shortcut equals a full forward pass."""

from __future__ import annotations

import pytest
import torch

from editors import EditRequest, apply_patch, detect_spec, revert_patch
from editors.core.keys import compute_keys, residual_at_subject
from editors.core.layer_walk import LayerWalk
from editors.core.values import _build_rows, _UpperStack
from editors.editor import Editor, corpus_statistics
from editors.model_spec import SPECS, edited_weight
from editors.patch import Patch, dense_of
from editors.tiny import TINY_CONFIGS, tiny_random_model
from editors.tracing import hidden_of

from .conftest import assert_same_weights, weights_snapshot

FAMILIES = sorted(TINY_CONFIGS)
REQUEST = EditRequest(
    prompt="The mother tongue of {} is", subject="Danielle Darrieux", target_new="English"
)
FAST = {"steps": 8, "prefixes": 2, "prefix_length": 4}


def test_every_family_has_a_tiny_config():
    assert set(FAMILIES) == set(SPECS)


@pytest.fixture(scope="module")
def editors_by_family(gpt2_tok, corpus_file, tmp_path_factory):
    cache = tmp_path_factory.mktemp("stats")
    out = {}
    for family in FAMILIES:
        model = tiny_random_model(family, len(gpt2_tok))
        out[family] = Editor(
            model, gpt2_tok, corpus_statistics(model, gpt2_tok, cache, corpus_file, samples=2_000)
        )
    return out


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", ["rome", "memit", "alphaedit", "nse", "grace", "ft-l", "ft-m"])
def test_edit_applies_changes_output_and_reverts_exactly(editors_by_family, family, method):
    editor = editors_by_family[family]
    model, tok = editor.model, editor.tok
    assert detect_spec(model).family == family
    ids = tok(REQUEST.text, return_tensors="pt")
    before_logits = model(**ids).logits
    snapshot = weights_snapshot(model)

    overrides = {"steps": 30, "lr": 0.5} if method == "grace" else FAST
    result = editor.compute([REQUEST], method, overrides)
    assert_same_weights(model, snapshot)  # computing a patch changes nothing
    spec = editor.spec
    for name, delta in result.patch.deltas.items():
        assert dense_of(delta).shape == model.get_parameter(name).shape
    layers = result.diagnostics.layers
    if method == "grace":  # codebook entries beside the module, no weight changes
        assert result.patch.deltas == {}
        assert set(result.patch.codebooks) == {spec.mlp_out_path(layer) for layer in layers}
    else:
        assert set(result.patch.deltas) == {spec.weight_name(layer) for layer in layers}

    applied = apply_patch(model, result.patch)
    after_logits = model(**ids).logits
    assert not torch.allclose(before_logits, after_logits)
    assert result.diagnostics.prob_after[0] > result.diagnostics.prob_before[0]
    revert_patch(model, applied)
    assert_same_weights(model, snapshot)
    assert torch.equal(model(**ids).logits, before_logits)


@pytest.mark.parametrize("family", FAMILIES)
def test_upper_stack_matches_a_full_forward_pass(editors_by_family, family):
    """Cached prefix + frozen lower blocks give the same logits as running everything."""
    editor = editors_by_family[family]
    model, tok, spec = editor.model, editor.tok, editor.spec
    layer = 1
    prefixes = ["", "Once upon a time, in a land far away. "]
    rows = _build_rows(tok, [REQUEST], prefixes, torch.device("cpu"))
    stack = _UpperStack(model, spec, layer, rows)
    delta = torch.randn(model.config.hidden_size) * 0.5
    fast = stack.run(delta.expand(rows.ids.shape[0], -1))

    block = model.get_submodule(spec.layer_path(layer))
    for row in range(rows.ids.shape[0]):
        lookup = int(rows.past_mask[row].sum())
        length = int(rows.mask[row].sum())
        ids = torch.cat([rows.past_ids[row, :lookup], rows.ids[row, :length]])[None]

        def bump(_m, _a, out, lookup=lookup):
            hidden = hidden_of(out).clone()
            hidden[0, lookup] += delta
            return (hidden, *out[1:]) if isinstance(out, tuple) else hidden

        handle = block.register_forward_hook(bump)
        try:
            full = model.base_model(input_ids=ids).last_hidden_state[0, lookup:]
        finally:
            handle.remove()
        torch.testing.assert_close(fast[row, :length], full, rtol=1e-4, atol=1e-4)


def test_conv1d_patch_is_stored_in_the_parameter_layout(editors_by_family):
    editor = editors_by_family["gpt2"]
    result = editor.compute([REQUEST], "rome", FAST)
    layer = result.diagnostics.layers[0]
    weight = edited_weight(editor.model, editor.spec, layer)
    delta = result.patch.deltas[editor.spec.weight_name(layer)]
    assert weight.shape[0] == editor.model.config.n_embd * 4  # Conv1D: [in, out]
    assert delta.dense().shape == weight.shape


@pytest.mark.parametrize("family", FAMILIES)
def test_layer_walk_matches_full_passes_on_the_edited_weights(editors_by_family, family):
    """The sweep's cached walk (core/layer_walk.py) reads the same keys and top outputs as
    full forward passes do once the layers below have been edited, also when its passes run
    over chunks of the requests (here two, the second shorter)."""
    editor = editors_by_family[family]
    model, tok, spec = editor.model, editor.tok, editor.spec
    requests = [
        REQUEST,
        EditRequest(prompt="{} was born in", subject="Ada", target_new="Rome"),
        EditRequest(prompt="The capital city of {} is", subject="Kenya", target_new="Oslo"),
    ]
    prefixes = ["", "Once upon a time, in a land far away. "]
    snapshot = weights_snapshot(model)
    walk = LayerWalk(model, tok, spec, requests, prefixes, chunk_rows=4)
    assert [len(chunk.rows.cols) for chunk in walk.chunks] == [4, 2]
    applied = []
    generator = torch.Generator().manual_seed(0)
    try:
        for layer in (0, 1):
            full_keys = compute_keys(model, tok, spec, requests, prefixes, [layer])[layer].mean
            torch.testing.assert_close(walk.keys(layer), full_keys, rtol=1e-4, atol=1e-5)
            full_top = residual_at_subject(model, tok, spec, requests, 1)
            torch.testing.assert_close(walk.block_output(1), full_top, rtol=1e-4, atol=1e-5)
            weight = edited_weight(model, spec, layer)
            shift = torch.randn(weight.shape, generator=generator) * 0.2
            applied.append(apply_patch(model, Patch("test", {spec.weight_name(layer): shift})))
            walk.advance(layer)
        cached = [c.hidden[c.bare, c.rows.cols[c.bare]].float() for c in walk.chunks]
        torch.testing.assert_close(
            torch.cat(cached),
            residual_at_subject(model, tok, spec, requests, 1),
            rtol=1e-4,
            atol=1e-5,
        )
    finally:
        for record in reversed(applied):
            revert_patch(model, record)
    assert_same_weights(model, snapshot)
