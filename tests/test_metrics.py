"""Metric definitions on known inputs and on the trained fact model."""

from __future__ import annotations

import math

from editors import EditRequest
from editors.metrics import evaluate, locality_reference, ngram_entropy, score_pairs


def test_ngram_entropy():
    assert ngram_entropy("a a a a a a") == 0.0
    text = "one two three four five"
    # 4 distinct bigrams, 3 distinct trigrams, each uniform
    expected = (2 / 3 * math.log2(4) + 4 / 3 * math.log2(3)) / 2
    assert math.isclose(ngram_entropy(text), expected)


def test_token_accuracy_and_nll(fact_model, fact_facts):
    model, tok = fact_model
    fact = fact_facts[0]
    scores = score_pairs(
        model, tok, [(fact["prompt"], fact["ground_truth"]), (fact["prompt"], fact["target_new"])]
    )
    assert scores.accuracy(0) == 1.0
    assert scores.accuracy(1) < 1.0
    assert scores.nll[0] < scores.nll[1]


def test_unedited_model_scores(fact_model, fact_facts):
    model, tok = fact_model
    requests = [
        EditRequest(
            prompt=f["prompt"],
            subject=f["subject"],
            target_new=f["target_new"],
            target_true=f["ground_truth"],
            locality=((f["locality_prompt"], f["locality_ground_truth"]),),
            portability=((f["prompt"], f["ground_truth"]),),
        )
        for f in fact_facts[:10]
    ]
    reference = locality_reference(model, tok, requests)
    m = evaluate(model, tok, requests, reference)
    assert m["efficacy"] == 0.0  # it knows the true facts
    assert m["locality"] == 1.0  # nothing changed since the reference
    assert m["neighborhood"] == 1.0
    assert m["portability"] == 1.0
    assert m["generalization"] is None  # no paraphrases given
    assert evaluate(model, tok, requests)["locality"] == 1.0  # vs the stated answers
