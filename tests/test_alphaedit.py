"""AlphaEdit's two promises on a small model: an update cannot move the outputs of keys in
the preserved subspace, and it leaves the keys of earlier edits (its history) alone; and
the history weight that AlphaEdit and NSE share."""

from __future__ import annotations

import pytest
import torch

from editors import EditRequest, Patch, apply_patch, revert_patch
from editors.alphaedit import AlphaEditHyperParams
from editors.core.history import earlier_keys
from editors.core.updates import null_space_projection, null_space_update
from editors.errors import InvalidValueError

from .conftest import assert_same_weights, weights_snapshot

FAST = {"steps": 10, "prefixes": 0, "layers": [1, 2]}
FIRST = EditRequest("The mother tongue of {} is", "Danielle Darrieux", "English")
SECOND = EditRequest("{} plays the position of", "Ricky Rubio", "goalkeeper")


def test_the_update_lies_in_the_null_space_of_the_preserved_keys():
    g = torch.Generator().manual_seed(0)
    basis = torch.linalg.qr(torch.randn(32, 32, generator=g, dtype=torch.float64))[0]
    spectrum = torch.cat([torch.full((20,), 5.0), torch.full((12,), 1e-6)]).double()
    c = basis @ torch.diag(spectrum) @ basis.T  # preserved keys span 20 of 32 directions
    p = null_space_projection(c, 1e-2)
    assert torch.allclose(p @ p, p, atol=1e-10) and round(float(torch.trace(p))) == 12
    keys, residuals = torch.randn(32, 3, generator=g), torch.randn(16, 3, generator=g)
    a, b = null_space_update(p, keys, residuals, None, lam=0.1)
    delta = a @ b.T
    preserved = basis[:, :20]
    assert torch.linalg.norm(delta @ preserved) < 1e-9 * torch.linalg.norm(delta)


def test_the_null_space_holds_at_most_its_share_of_the_preserved_energy():
    # a spectrum like a real MLP's: one outlier direction hundreds of times the mean
    g = torch.Generator().manual_seed(2)
    basis = torch.linalg.qr(torch.randn(64, 64, generator=g, dtype=torch.float64))[0]
    spectrum = torch.logspace(-4, 0, 64, dtype=torch.float64)
    spectrum[-1] = 500.0
    c = basis @ torch.diag(spectrum) @ basis.T
    for energy in (1e-3, 1e-2, 1e-1):
        p = null_space_projection(c, energy)
        held = float(torch.trace(p @ c) / torch.trace(c))
        assert 0 < held <= energy
        # one more direction would break the budget: P is the widest that keeps it
        widest = round(float(torch.trace(p)))
        assert float(spectrum.sort().values[: widest + 1].sum() / spectrum.sum()) > energy


def test_the_preserved_energy_left_in_the_null_space_weighs_against_the_update():
    # no exact null space (as in SmolLM2): P keeps 10 % of C's energy, spread unevenly
    g = torch.Generator().manual_seed(3)
    basis = torch.linalg.qr(torch.randn(48, 48, generator=g, dtype=torch.float64))[0]
    c = basis @ torch.diag(torch.logspace(-3, 1, 48, dtype=torch.float64)) @ basis.T
    p = null_space_projection(c, 0.1)
    keys, residuals = torch.randn(48, 2, generator=g), torch.randn(16, 2, generator=g)
    lam, lam_c = 0.01, 30.0

    def objective(delta: torch.Tensor) -> float:
        keys64 = keys.double()
        miss = delta @ keys64 - residuals.double()
        damage = lam_c * torch.trace(delta @ c @ delta.T)
        return float((miss**2).sum() + damage + lam * (delta**2).sum())

    hard, soft = (
        null_space_update(p, keys, residuals, None, lam, preserved)
        for preserved in (None, lam_c * c)
    )
    deltas = [a @ b.T for a, b in (hard, soft)]
    soft_delta = deltas[1]
    assert torch.allclose(soft_delta @ p, soft_delta, atol=1e-10)  # still inside P
    # the damage to preserved keys falls, and the soft update is the objective's minimiser
    damage = [float(torch.trace(d @ c @ d.T)) for d in deltas]
    assert damage[1] < 0.5 * damage[0], damage
    for _ in range(5):
        nudge = 1e-3 * torch.randn(16, 48, generator=g, dtype=torch.float64) @ p
        assert objective(soft_delta) < objective(soft_delta + nudge)


def test_earlier_keys_are_left_almost_alone():
    g = torch.Generator().manual_seed(1)
    p = torch.eye(32, dtype=torch.float64)  # no preserved keys: only the history protects
    first, second = torch.randn(32, 2, generator=g), torch.randn(32, 2, generator=g)
    residuals = torch.randn(16, 2, generator=g)
    unprotected = null_space_update(p, second, residuals, None, lam=0.1)
    protected = null_space_update(p, second, residuals, first.double() @ first.double().T, 0.1)
    moved = [torch.linalg.norm(a @ b.T @ first.double()) for a, b in (unprotected, protected)]
    assert moved[1] < 0.05 * moved[0]


@pytest.fixture(scope="module")
def editor(tiny_llama_editor_factory):
    return tiny_llama_editor_factory()


def test_the_patch_carries_its_keys_and_the_history_changes_the_next_edit(editor):
    snapshot = weights_snapshot(editor.model)
    first = editor.compute([FIRST], "alphaedit", FAST)
    assert sorted(first.patch.keys) == [1, 2]
    assert first.patch.keys[1].shape[1] == 1  # one request, one (prefix-averaged) key
    assert first.diagnostics.prob_after[0] > first.diagnostics.prob_before[0]
    applied = apply_patch(editor.model, first.patch)
    try:
        alone = editor.compute([SECOND], "alphaedit", FAST)
        after = editor.compute([SECOND], "alphaedit", FAST, history=[first.patch])
    finally:
        revert_patch(editor.model, applied)
    assert_same_weights(editor.model, snapshot)
    key = first.patch.keys[2].double()
    name = editor.spec.weight_name(2)
    moved_alone = torch.linalg.norm(alone.patch.deltas[name].dense().double() @ key)
    moved_after = torch.linalg.norm(after.patch.deltas[name].dense().double() @ key)
    # the history protects the first edit's key (partly here: a random model's keys for
    # two prompts are strongly correlated; the exact trade-off is checked above)
    assert moved_after < 0.8 * moved_alone


def test_rewinding_optimises_the_targets_on_the_weights_before_the_history(editor):
    """With `rewind` AlphaEdit's targets are sought on the weights before the history, as
    NSE's are: the same loss curve as the edit alone on the unedited model; without it,
    on the edited weights."""
    first = editor.compute([FIRST], "alphaedit", FAST)
    alone = editor.compute([SECOND], "alphaedit", FAST)
    applied = apply_patch(editor.model, first.patch)
    try:
        runs = {
            name: editor.compute([SECOND], "alphaedit", options, history=[first.patch])
            for name, options in (
                ("current", FAST),
                ("rewound", {**FAST, "rewind": True}),
                ("anchored", {**FAST, "rewind": True, "edited_context": True}),
            )
        }
    finally:
        revert_patch(editor.model, applied)
    losses = {name: result.diagnostics.losses for name, result in runs.items()}
    assert losses["rewound"] == pytest.approx(alone.diagnostics.losses, rel=1e-6)
    # a random model's first edit moves the next prompt's loss by a few 1e-4 only
    assert losses["current"][0] != pytest.approx(alone.diagnostics.losses[0], rel=1e-5)
    # anchored: the subject as before the history, the context as after it
    assert losses["anchored"][0] != pytest.approx(alone.diagnostics.losses[0], rel=1e-5)
    assert losses["anchored"][0] != pytest.approx(losses["current"][0], rel=1e-5)


@pytest.mark.parametrize("method", ["alphaedit", "nse"])
def test_a_heavier_history_weight_moves_the_earlier_key_less(editor, method):
    # NSE's lam C would protect the key on its own here: keep it weak to see the history's
    options = {**FAST, "mom2_update_weight": 1.0} if method == "nse" else FAST
    first = editor.compute([FIRST], method, options)
    applied = apply_patch(editor.model, first.patch)
    try:
        moved = []
        for weight in (1.0, 50.0):
            after = editor.compute(
                [SECOND], method, {**options, "history_weight": weight}, history=[first.patch]
            )
            for layer in (1, 2):
                delta = after.patch.deltas[editor.spec.weight_name(layer)].dense().double()
                moved.append(torch.linalg.norm(delta @ first.patch.keys[layer].double()))
    finally:
        revert_patch(editor.model, applied)
    light, heavy = moved[:2], moved[2:]
    assert all(h < 0.8 * w for h, w in zip(heavy, light, strict=True)), (light, heavy)


def test_the_history_gram_is_the_same_whether_extended_or_summed_afresh():
    """earlier_keys keeps a running K_p K_p^T; extending it must give the bits a cold sum
    gives, and a shorter history (after a rollback) must not reuse the longer one's sum."""
    generator = torch.Generator().manual_seed(0)
    patches = [
        Patch("alphaedit", {}, keys={3: torch.randn(16, 2, generator=generator)}) for _ in range(4)
    ]
    expected = sum(p.keys[3].double() @ p.keys[3].double().T for p in patches)
    earlier_keys(patches[:2], 3)
    first_keys = patches[0].keys[3]
    patches[0].keys[3] = torch.full_like(first_keys, float("nan"))  # unread if the sum is reused
    extended = earlier_keys(patches, 3, weight=2.0)
    patches[0].keys[3] = first_keys
    assert extended is not None
    torch.testing.assert_close(extended, 2.0 * expected)
    rolled_back = earlier_keys(patches[:1], 3)
    assert rolled_back is not None
    torch.testing.assert_close(
        rolled_back, patches[0].keys[3].double() @ patches[0].keys[3].T.double()
    )
    copies = [Patch("alphaedit", {}, keys=dict(p.keys)) for p in patches]  # new objects
    afresh = earlier_keys(copies, 3)
    assert afresh is not None
    earlier_keys(patches[:3], 3)  # a running sum over three, then extended by one
    again = earlier_keys(patches, 3)
    assert again is not None
    assert torch.equal(afresh, again)  # same bits, extended or summed from nothing


def test_bad_alphaedit_hyperparameters_are_named():
    for overrides, field in (
        ({"nullspace_energy": 2.0}, "nullspace_energy"),
        ({"l2": 0}, "l2"),
        ({"mom2_update_weight": -1.0}, "mom2_update_weight"),
        ({"history_weight": -1.0}, "history_weight"),
        ({"edited_context": True}, "edited_context"),
    ):
        with pytest.raises(InvalidValueError) as err:
            AlphaEditHyperParams(**overrides)
        assert err.value.field == field
