"""GRACE on a small model: an edit is codebook entries, not weight changes; the entries fire
near their keys only, travel in the patch bytes, and applying and reverting swaps them."""

from __future__ import annotations

import pytest
import torch

from editors import EditRequest, apply_patch, revert_patch
from editors.codebook import Codebook, codebook_of
from editors.errors import InvalidValueError, PatchError
from editors.grace import GRACEHyperParams
from editors.metrics import evaluate
from editors.patch import Patch

from .conftest import assert_same_weights, weights_snapshot

FAST = {"layer": 2, "steps": 40, "lr": 0.5}
FIRST = EditRequest("The mother tongue of {} is", "Danielle Darrieux", "English")
SECOND = EditRequest("{} plays the position of", "Ricky Rubio", "goalkeeper")


def test_an_entry_fires_only_within_its_radius():
    keys = torch.tensor([[0.0, 0.0], [10.0, 0.0]])
    book = Codebook(keys, torch.tensor([[1.0], [2.0]]), torch.tensor([1.0, 1.0]))
    inputs = torch.tensor([[[0.5, 0.0], [9.2, 0.5], [5.0, 0.0]]])
    output = torch.full((1, 3, 1), -1.0)
    replaced = book.replace(inputs, output)
    assert replaced.flatten().tolist() == [1.0, 2.0, -1.0]


@pytest.fixture(scope="module")
def editor(tiny_llama_editor_factory):
    return tiny_llama_editor_factory()


def test_a_grace_edit_is_codebook_entries_that_make_the_model_say_the_target(editor):
    snapshot = weights_snapshot(editor.model)
    result = editor.compute([FIRST, SECOND], "grace", FAST)
    assert_same_weights(editor.model, snapshot)
    patch = result.patch
    assert patch.deltas == {}
    (path,) = patch.codebooks
    targets = [
        len(editor.tok(r.target, add_special_tokens=False)["input_ids"]) for r in (FIRST, SECOND)
    ]
    assert len(patch.codebooks[path]) == sum(targets)  # one entry per target token
    module = editor.model.get_submodule(path)
    before = evaluate(editor.model, editor.tok, [FIRST, SECOND])
    applied = apply_patch(editor.model, patch)
    try:
        assert_same_weights(editor.model, snapshot)  # no weight moved
        assert len(codebook_of(module)) == sum(targets)
        after = evaluate(editor.model, editor.tok, [FIRST, SECOND])
    finally:
        revert_patch(editor.model, applied)
    assert codebook_of(module) is None
    assert before["reliability"] < 1.0 and after["reliability"] == 1.0
    assert evaluate(editor.model, editor.tok, [FIRST, SECOND]) == before


def test_codebook_entries_survive_the_patch_bytes_and_stack(editor):
    first = editor.compute([FIRST], "grace", FAST).patch
    second = editor.compute([SECOND], "grace", FAST).patch
    again = Patch.from_bytes(first.to_bytes(), expected_sha256=first.sha256)
    (path,) = first.codebooks
    assert torch.equal(again.codebooks[path].keys, first.codebooks[path].keys)
    assert torch.equal(again.codebooks[path].values, first.codebooks[path].values)
    merged = first.merged(second)
    assert len(merged.codebooks[path]) == len(first.codebooks[path]) + len(second.codebooks[path])
    module = editor.model.get_submodule(path)
    outer = apply_patch(editor.model, again)
    inner = apply_patch(editor.model, second)
    try:
        assert len(codebook_of(module)) == len(merged.codebooks[path])
        assert evaluate(editor.model, editor.tok, [FIRST, SECOND])["reliability"] == 1.0
        revert_patch(editor.model, inner)
        assert len(codebook_of(module)) == len(first.codebooks[path])
    finally:
        revert_patch(editor.model, outer)
    assert codebook_of(module) is None


def test_a_codebook_for_a_missing_or_mismatched_module_is_refused(editor):
    book = Codebook(torch.zeros(1, 3), torch.zeros(1, 3), torch.ones(1))
    snapshot = weights_snapshot(editor.model)
    for path in ("model.layers.99.mlp.down_proj", "model.layers.1.mlp.down_proj"):
        with pytest.raises(PatchError):
            apply_patch(editor.model, Patch("grace", {}, codebooks={path: book}))
    assert_same_weights(editor.model, snapshot)
    assert codebook_of(editor.model.get_submodule("model.layers.1.mlp.down_proj")) is None


def test_bad_grace_hyperparameters_are_named():
    for overrides, field in (({"radius": 0.0}, "radius"), ({"steps": 0}, "steps")):
        with pytest.raises(InvalidValueError) as caught:
            GRACEHyperParams(**overrides)
        assert caught.value.field == field
