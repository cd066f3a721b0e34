"""Layer sweeps of the spread methods (core/spread.py), on the small fact-trained GPT-2."""

from __future__ import annotations

from editors import apply_patch, revert_patch
from editors.datasets import counterfact_request
from editors.metrics import score_pairs

from .conftest import assert_same_weights, weights_snapshot
from .test_fact_model import STRONG


def _target_nll(editor, requests, patch) -> float:
    applied = apply_patch(editor.model, patch)
    try:
        pairs = [(r.text, r.target_new) for r in requests]
        return sum(score_pairs(editor.model, editor.tok, pairs).nll)
    finally:
        revert_patch(editor.model, applied)


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
    assert _target_nll(fact_editor, requests, three.patch) < _target_nll(
        fact_editor, requests, one.patch
    )
    assert_same_weights(fact_editor.model, snapshot)


def test_the_sweeps_stop_once_every_request_is_within_tolerance(fact_editor, fact_facts):
    """With a loose tolerance the first sweep already brings every request close enough."""
    requests = [counterfact_request(f) for f in fact_facts[20:23]]
    loose = fact_editor.compute(requests, "memit", {**STRONG, "iterations": 5, "tolerance": 0.99})
    assert loose.diagnostics.extra["sweeps"] == 1
