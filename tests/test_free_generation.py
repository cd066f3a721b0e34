"""Free-generation success: the rule that judges a continuation, and the metrics it gives on
a model that has memorised its facts (the trained fact model)."""

from __future__ import annotations

import pytest

from editors.free_generation import gives_same_answer, states_answer
from editors.metrics import evaluate_cases, locality_reference
from editors.requests import EditRequest


@pytest.mark.parametrize(
    ("continuation", "answer", "stated"),
    [
        (" English.", "English", True),
        (" the English language", "English", True),
        (' "English" and French', "English", True),
        (" ENGLISH", "english", True),
        (" New York City", "New York", True),
        (" The Beatles played", "The Beatles", True),
        (" Beatles", "The Beatles", True),
        (" French, and later English", "English", False),  # another object named first
        (" a native English speaker", "English", False),
        (" Englishman", "English", False),  # a longer word is another word
        (" New Jersey", "New York", False),
        ("", "English", False),
        (" anything", "", False),
    ],
)
def test_a_continuation_states_the_answer_only_when_it_begins_with_it(continuation, answer, stated):
    assert states_answer(continuation, answer) is stated


def test_the_same_answer_compares_as_many_words_as_the_stated_answer_has():
    assert gives_same_answer(" guitar and drums", " guitar, loudly", "guitar")
    assert not gives_same_answer(" guitar and drums", " piano and drums", "guitar")
    assert gives_same_answer(" the red car", " Red car", "red car")  # a wrong answer kept
    assert not gives_same_answer(" Paris", " Lyon", "Paris")


def test_free_generation_metrics_on_a_model_that_knows_its_facts(fact_model, fact_facts):
    model, tok = fact_model
    facts = fact_facts[:6]

    def request(fact: dict, target: str) -> EditRequest:
        return EditRequest(
            fact["prompt"],
            fact["subject"],
            target,
            paraphrases=(fact["prompt"],),
            locality=((fact["locality_prompt"], fact["locality_ground_truth"]),),
            portability=((fact["locality_prompt"], fact["locality_ground_truth"]),),
        )

    known = [request(f, f["ground_truth"]) for f in facts]
    unknown = [request(f, f["target_new"]) for f in facts]
    reference = locality_reference(model, tok, known)
    assert all(len(r.continuations) == 1 and r.continuations[0] for r in reference)
    for case in evaluate_cases(model, tok, known, reference):
        assert case["free_rewrite"] == case["free_paraphrase"] == 1.0
        assert case["free_locality"] == case["free_portability"] == 1.0
    for case in evaluate_cases(model, tok, unknown, reference):
        assert case["free_rewrite"] == case["free_paraphrase"] == 0.0
        assert case["free_locality"] == 1.0  # the same weights give the same answers
    without = evaluate_cases(model, tok, unknown, reference, free_generation=False)
    assert all(case["free_rewrite"] is None for case in without)
