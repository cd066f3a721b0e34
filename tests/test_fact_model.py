"""Editing a small GPT-2 (Conv1D weights) the project trains on real CounterFact facts.

A model this small memorises its facts as a lookup at the answer position rather than as
attributes written at the subject (where real LMs keep them and ROME edits), so an edit here
raises the new target's probability by orders of magnitude without always overturning a
memorised answer. The flip-the-fact behaviour is asserted on real LMs (test_real_models.py).
"""

from __future__ import annotations

import math

import pytest

from editors import apply_patch, revert_patch
from editors.datasets import counterfact_request
from editors.metrics import score_pairs

from .conftest import assert_same_weights, weights_snapshot

# A memorising model's answers sit at probabilities near 1 - 1e-10: it takes far larger
# residual changes, and more steps, than a pretrained LM. Its own sampled prefixes are
# gibberish to it, so the bare prompt is the only context.
STRONG = {"clamp_norm_factor": 4.0, "steps": 60, "lr": 2.0, "prefixes": 0}


def _accuracy(model, tok, pairs) -> float:
    scores = score_pairs(model, tok, pairs)
    return sum(scores.accuracy(i) for i in range(len(pairs))) / len(pairs)


def test_the_trained_model_knows_its_facts(fact_model, fact_facts):
    model, tok = fact_model
    assert _accuracy(model, tok, [(f["prompt"], f["ground_truth"]) for f in fact_facts]) == 1.0


@pytest.mark.parametrize("method", ["rome", "memit"])
def test_edit_raises_the_target_and_keeps_other_facts(fact_editor, fact_facts, method):
    model, tok = fact_editor.model, fact_editor.tok
    edited, others = fact_facts[:3], fact_facts[3:]
    requests = [counterfact_request(f) for f in edited]
    pairs = [(f["prompt"], f["target_new"]) for f in edited]
    before = score_pairs(model, tok, pairs).nll
    snapshot = weights_snapshot(model)
    result = fact_editor.compute(requests, method, STRONG)
    assert_same_weights(model, snapshot)
    applied = apply_patch(model, result.patch)
    try:
        after = score_pairs(model, tok, pairs).nll
        # how far an update moves a memorised answer varies with the trained weights, and the
        # trained weights vary with the CPU's arithmetic and the library versions; what holds:
        # ROME's rank-one update raises P(target_new) of every edited fact at least 2x and
        # 5x on average; MEMIT, spreading three facts over the layers, raises it on average
        raised = [b - a for a, b in zip(after, before, strict=True)]
        mean_raised = sum(raised) / len(raised)
        if method == "rome":
            assert min(raised) > math.log(2) and mean_raised > math.log(5), (before, after)
        else:
            assert mean_raised > 0.5, (before, after)
        kept = _accuracy(model, tok, [(f["prompt"], f["ground_truth"]) for f in others])
        # three strong edits on a 4-layer memoriser cost a few facts
        assert kept >= 0.8
    finally:
        revert_patch(model, applied)
    assert_same_weights(model, snapshot)


def test_same_seed_same_patch_bit_for_bit(fact_editor, fact_facts):
    request = counterfact_request(fact_facts[3])
    first = fact_editor.compute([request], "rome", {"seed": 7})
    fact_editor._prefixes.clear()  # sample the prefixes again, from the seed
    second = fact_editor.compute([request], "rome", {"seed": 7})
    assert first.patch.to_bytes() == second.patch.to_bytes()
    assert first.diagnostics.prefixes == second.diagnostics.prefixes
    replayed = fact_editor.compute(
        [request], "rome", {"seed": 7}, prefixes=first.diagnostics.prefixes
    )
    assert replayed.patch.sha256 == first.patch.sha256
    other_seed = fact_editor.compute([request], "rome", {"seed": 8})
    assert other_seed.diagnostics.prefixes != first.diagnostics.prefixes


def test_several_rome_requests_edit_one_after_another(fact_editor, fact_facts):
    batch = [counterfact_request(f) for f in fact_facts[10:13]]
    result = fact_editor.compute(batch, "rome")
    (name,) = result.patch.deltas
    assert result.patch.deltas[name].rank == 3
    assert len(result.diagnostics.prob_after) == 3


def test_diagnostics_report_the_work(fact_editor, fact_facts):
    result = fact_editor.compute([counterfact_request(fact_facts[5])], "rome")
    d = result.diagnostics
    assert d.method == "rome" and len(d.layers) == 1
    assert 0 < d.steps <= 25 and len(d.losses) == d.steps
    assert d.prob_after[0] > d.prob_before[0]
    assert d.prefixes[0] == "" and len(d.prefixes) == 6
    assert all(v > 0 for v in d.delta_norms.values())
    assert {"keys", "values", "update", "total"} <= set(d.seconds)
