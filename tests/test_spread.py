"""Layer sweeps of the spread methods (core/spread.py), on the small fact-trained GPT-2."""

from __future__ import annotations

import pytest
import torch

from editors import EditRequest
from editors.core.keys import residual_at_subject
from editors.core.spread import Sweeps, sweep_over_layers
from editors.datasets import counterfact_request

from .conftest import assert_same_weights, weights_snapshot
from .test_fact_model import STRONG


def test_later_sweeps_carry_the_requests_still_short_of_their_targets(fact_editor, fact_facts):
    """One sweep lands short of z (each layer's closed form shrinks its share); each later
    sweep spreads what is left for the requests still further than `tolerance` away, so
    the targets come closer, and the patch holds one factor per request and sweep."""
    requests = [counterfact_request(f) for f in fact_facts[20:23]]
    snapshot = weights_snapshot(fact_editor.model)
    one = fact_editor.compute(requests, "memit", {**STRONG, "iterations": 1})
    three = fact_editor.compute(requests, "memit", {**STRONG, "iterations": 3, "tolerance": 0.0})
    assert_same_weights(fact_editor.model, snapshot)
    assert one.diagnostics.extra["sweeps"] == 1
    assert three.diagnostics.extra["sweeps"] == 3
    for name, delta in three.patch.deltas.items():
        assert delta.rank == 3 * one.patch.deltas[name].rank == 3 * len(requests)
    # each request ends closer to its target z (the memoriser's own answers hold the target
    # tokens' probability down, so z, not P(target), is what the sweeps are measured by)
    left_one, left_three = (
        one.diagnostics.extra["target_gap_left"],
        three.diagnostics.extra["target_gap_left"],
    )
    assert all(t < o / 10 for t, o in zip(left_three, left_one, strict=True)), (
        left_one,
        left_three,
    )
    assert_same_weights(fact_editor.model, snapshot)


def test_the_sweeps_stop_once_every_request_is_within_tolerance(fact_editor, fact_facts):
    """With a loose tolerance the first sweep already brings every request close enough."""
    requests = [counterfact_request(f) for f in fact_facts[20:23]]
    loose = fact_editor.compute(requests, "memit", {**STRONG, "iterations": 5, "tolerance": 0.99})
    assert loose.diagnostics.extra["sweeps"] == 1


def _overshooting_sweep(editor, share_cap: float) -> tuple[list[float], float]:
    """One sweep over three layers of a tiny Llama whose layer solve delivers ten times
    what it is asked for: the norms of the changes each layer was asked for, and the even
    share |z - h| / 3 of the starting distance."""
    requests = [EditRequest("The mother tongue of {} is", "Danielle Darrieux", "English")]
    model, tok, spec, layers = editor.model, editor.tok, editor.spec, [0, 1, 2]
    start = residual_at_subject(model, tok, spec, requests, layers[-1])
    z = start + 0.5 * start.norm() * torch.nn.functional.normalize(torch.ones_like(start))
    asked: list[float] = []

    def overshoot(_layer: int, keys: torch.Tensor, change: torch.Tensor):
        asked.append(float(change.norm()))
        right = keys @ torch.linalg.pinv(keys.T @ keys)  # B with B^T K = I
        return 10.0 * change, right

    sweep_over_layers(
        model,
        tok,
        spec,
        requests,
        [""],
        layers,
        z,
        overshoot,
        "test",
        Sweeps(1, 0.0, share_cap=share_cap),
    )
    return asked, float((z - start).norm()) / len(layers)


def test_a_layer_share_cap_stops_an_overshooting_layer_from_growing_the_next_ones_task(
    tiny_llama_editor_factory,
):
    """Each layer's task is what the layers below left; a layer that overshoots leaves the
    next one a larger task, and the growth compounds up the stack. With `share_cap` 1 no
    layer is asked for more than its even share of the starting distance."""
    editor = tiny_llama_editor_factory()
    snapshot = weights_snapshot(editor.model)
    free, share = _overshooting_sweep(editor, 0.0)
    capped, _ = _overshooting_sweep(editor, 1.0)
    assert_same_weights(editor.model, snapshot)
    assert free[0] == pytest.approx(share, rel=1e-3) == capped[0]
    assert max(free) > 1.5 * share, (free, share)  # uncapped, the overshoot compounds
    assert max(capped) <= share * (1 + 1e-4), (capped, share)
