"""Patches: serialisation, hashing, tamper detection, exact apply/revert."""

from __future__ import annotations

import pytest
import torch

from editors import FactoredDelta, Patch, PatchError, apply_patch, revert_patch
from editors.tiny import tiny_random_model

from .conftest import assert_same_weights, weights_snapshot


def _patch(model: torch.nn.Module) -> Patch:
    g = torch.Generator().manual_seed(0)
    name = "model.layers.1.mlp.down_proj.weight"
    out_dim, in_dim = model.get_parameter(name).shape
    return Patch(
        "rome",
        {
            name: FactoredDelta(
                torch.randn(out_dim, 2, generator=g), torch.randn(in_dim, 2, generator=g)
            ),
            "model.layers.0.mlp.down_proj.weight": torch.randn(out_dim, in_dim, generator=g) * 1e-3,
        },
        {"layer": "1"},
        {3: torch.randn(in_dim, 2, generator=g)},
    )


def test_round_trip_keeps_content_and_hash():
    model = tiny_random_model("llama", 64)
    patch = _patch(model)
    data = patch.to_bytes()
    again = Patch.from_bytes(data, expected_sha256=patch.sha256)
    assert again.method == "rome" and again.metadata == {"layer": "1"}
    assert again.sha256 == patch.sha256
    assert torch.equal(again.keys[3], patch.keys[3])  # the keys an edit wrote travel along
    for name, delta in patch.deltas.items():
        assert torch.equal(
            again.deltas[name].dense() if isinstance(delta, FactoredDelta) else again.deltas[name],
            delta.dense() if isinstance(delta, FactoredDelta) else delta,
        )


def test_corrupted_or_mismatched_bytes_are_refused():
    model = tiny_random_model("llama", 64)
    patch = _patch(model)
    data = bytearray(patch.to_bytes())
    data[-1] ^= 0xFF
    with pytest.raises(PatchError, match="sha256"):
        Patch.from_bytes(bytes(data), expected_sha256=patch.sha256)
    with pytest.raises(PatchError, match="safetensors"):
        Patch.from_bytes(b"not a patch at all")


def test_apply_then_revert_is_bit_exact():
    model = tiny_random_model("llama", 64)
    snapshot = weights_snapshot(model)
    applied = apply_patch(model, _patch(model))
    assert not torch.equal(
        model.get_parameter("model.layers.1.mlp.down_proj.weight"),
        snapshot["model.layers.1.mlp.down_proj.weight"],
    )
    revert_patch(model, applied)
    assert_same_weights(model, snapshot)


def test_a_patch_that_does_not_fit_leaves_the_model_unchanged():
    model = tiny_random_model("llama", 64)
    snapshot = weights_snapshot(model)
    wrong = Patch(
        "rome",
        {
            "model.layers.0.mlp.down_proj.weight": torch.zeros(64, 256),  # right shape
            "model.layers.1.mlp.down_proj.weight": torch.zeros(3, 3),  # wrong shape
        },
    )
    with pytest.raises(PatchError, match="shape"):
        apply_patch(model, wrong)
    with pytest.raises(PatchError, match="no parameter"):
        apply_patch(model, Patch("rome", {"nope.weight": torch.zeros(1)}))
    assert_same_weights(model, snapshot)


def test_merged_patches_add_up():
    model = tiny_random_model("llama", 64)
    a, b = _patch(model), _patch(model)
    merged = a.merged(b)
    name = "model.layers.1.mlp.down_proj.weight"
    assert merged.deltas[name].rank == 4
    torch.testing.assert_close(merged.deltas[name].dense(), 2 * a.deltas[name].dense())
