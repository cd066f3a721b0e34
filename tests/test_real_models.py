"""Behaviour on real pretrained LMs: SmolLM2-135M-Instruct (Llama family) and Gemma 3 270M.

The same tests run on both models (the `real_editor` fixture is parametrised)."""

from __future__ import annotations

import math

import pytest
import torch

from editors import EditRequest, apply_patch, revert_patch
from editors.datasets import counterfact_request
from editors.metrics import evaluate, locality_reference, score_pairs

from .conftest import assert_same_weights, counterfact, weights_snapshot

pytestmark = pytest.mark.slow

DARRIEUX = EditRequest(
    prompt="The mother tongue of {} is",
    subject="Danielle Darrieux",
    target_new="English",
    target_true="French",
)


def _greedy(editor, text: str, tokens: int = 6) -> str:
    ids = editor.tok(text, return_tensors="pt")
    with torch.no_grad():
        out = editor.model.generate(
            **ids, max_new_tokens=tokens, do_sample=False, pad_token_id=editor.tok.pad_token_id
        )
    return editor.tok.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)


def test_rome_changes_what_the_model_says_and_reverts_exactly(real_editor):
    snapshot = weights_snapshot(real_editor.model)
    assert "English" not in _greedy(real_editor, DARRIEUX.text)
    result = real_editor.compute([DARRIEUX], "rome")
    applied = apply_patch(real_editor.model, result.patch)
    try:
        assert _greedy(real_editor, DARRIEUX.text).strip().startswith("English")
        assert "Paris" in _greedy(real_editor, "The Eiffel Tower is located in the city of")
    finally:
        revert_patch(real_editor.model, applied)
    assert_same_weights(real_editor.model, snapshot)


def _cases():
    # train split: it was used for tuning, the edit split is kept for reporting
    return [counterfact_request(r) for r in counterfact("train", 6, start=200)]


def test_rome_on_counterfact_cases(real_editor):
    requests = _cases()
    reference = locality_reference(real_editor.model, real_editor.tok, requests)
    per_case = []
    for request, ref in zip(requests, reference, strict=True):
        result = real_editor.compute([request], "rome")
        applied = apply_patch(real_editor.model, result.patch)
        per_case.append(evaluate(real_editor.model, real_editor.tok, [request], [ref]))
        revert_patch(real_editor.model, applied)
    assert sum(c["efficacy"] for c in per_case) / len(per_case) >= 5 / 6
    assert sum(c["locality"] for c in per_case) / len(per_case) >= 0.8


def _context_nll(editor, request: EditRequest, prefixes: list[str]) -> list[float]:
    pairs = [(prefix + request.text, request.target_new) for prefix in prefixes]
    return score_pairs(editor.model, editor.tok, pairs).nll


def test_rome_reaches_its_target_where_the_update_delivers_it(real_editor):
    """The rank-one update makes a different share of r at each context's key (on this case
    far less than r at the bare prompt). ROME optimises r as the update will deliver it, so
    the target probability it reports is the edited model's own, context by context, and
    the bare prompt (what reliability scores) says the target too."""
    request = counterfact_request(counterfact("train", 1, start=5)[0])  # Michel Denisot
    result = real_editor.compute([request], "rome")
    prefixes = result.diagnostics.prefixes
    applied = apply_patch(real_editor.model, result.patch)
    try:
        nll = _context_nll(real_editor, request, prefixes)
    finally:
        revert_patch(real_editor.model, applied)
    reported = -math.log(result.diagnostics.prob_after[0])
    assert sum(nll) / len(nll) == pytest.approx(reported, abs=0.01)
    assert nll[0] < 0.2  # the bare prompt: P(target) > 0.8


def test_memit_on_counterfact_cases(real_editor):
    editor = real_editor
    requests = _cases()
    reference = locality_reference(editor.model, editor.tok, requests)
    result = editor.compute(requests, "memit")
    applied = apply_patch(editor.model, result.patch)
    scores = evaluate(editor.model, editor.tok, requests, reference)
    revert_patch(editor.model, applied)
    assert scores["efficacy"] >= 5 / 6
    assert scores["locality"] >= 0.8


def test_patch_is_deterministic_on_cpu(real_editor):
    first = real_editor.compute([DARRIEUX], "rome")
    second = real_editor.compute([DARRIEUX], "rome")
    assert first.patch.sha256 == second.patch.sha256


def test_sequential_evaluation_on_smollm2_flips_the_edited_facts(smollm2_editor):
    """The evaluation runner on the real model: three sequential ROME edits win the
    CounterFact comparison where the unedited model lost it, and the model comes back."""
    from editors.evaluation import EvaluationPlan, run_evaluation

    editor = smollm2_editor
    snapshot = weights_snapshot(editor.model)
    cases = [counterfact_request(r) for r in counterfact("train", 3, start=40)]
    plan = EvaluationPlan(protocol="sequential", fluency=False)
    summary, _ = run_evaluation(editor, cases, plan)
    assert summary["final"]["efficacy"] == 1.0
    assert summary["final"]["efficacy_magnitude"] > summary["final_baseline"]["efficacy_magnitude"]
    # the probe text is about nothing edited: its perplexity barely moves
    assert summary["final"]["perplexity"] < 1.2 * summary["baseline"]["perplexity"]
    assert_same_weights(editor.model, snapshot)


def test_ft_m_fine_tunes_one_fact_into_smollm2_and_reverts(smollm2_editor):
    editor = smollm2_editor
    snapshot = weights_snapshot(editor.model)
    result = editor.compute([DARRIEUX], "ft-m")
    assert_same_weights(editor.model, snapshot)  # computing changes nothing
    applied = apply_patch(editor.model, result.patch)
    try:
        scores = evaluate(editor.model, editor.tok, [DARRIEUX])
        assert scores["reliability"] == 1.0 and scores["efficacy"] == 1.0
    finally:
        revert_patch(editor.model, applied)
    assert_same_weights(editor.model, snapshot)
