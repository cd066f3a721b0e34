"""editors.evaluation on a small GPT-2: what each protocol records, that the model comes back
bit for bit however a run ends, and that the baseline is the unedited model's score."""

from __future__ import annotations

import pytest

from editors.datasets import counterfact_request, mquake_case
from editors.editor import Editor, corpus_statistics
from editors.errors import EditError
from editors.evaluation import EvaluationPlan, run_evaluation
from editors.metrics import evaluate, locality_reference
from editors.models import load_model

from .conftest import assert_same_weights, counterfact, shared, weights_snapshot


@pytest.fixture(scope="module")
def tiny_editor(tiny_model_dir, corpus_file, tmp_path_factory) -> Editor:
    model, tok = load_model(str(tiny_model_dir))
    stats = corpus_statistics(
        model, tok, tmp_path_factory.mktemp("stats"), corpus_file, samples=2_000
    )
    return Editor(model, tok, stats)


@pytest.fixture(scope="module")
def cases():
    return [counterfact_request(r) for r in counterfact("train", 6)]


def test_sequential_run_records_checkpoints_and_restores_the_model(tiny_editor, cases):
    model, tok = tiny_editor.model, tiny_editor.tok
    snapshot = weights_snapshot(model)
    plan = EvaluationPlan(protocol="sequential", batch_size=2, checkpoint_every=2)
    recorded = []
    summary, rows = run_evaluation(tiny_editor, cases, plan, record=recorded.append)
    assert recorded == rows
    assert [r.kind for r in rows] == [
        "baseline",
        "checkpoint",
        "checkpoint",
        *["case"] * 6,
        "final",
    ]
    assert [r.edits_done for r in rows if r.kind == "checkpoint"] == [2, 4]
    for row in rows:  # each aggregate row carries the reach of the edit made since the last
        if row.kind in ("checkpoint", "final"):
            assert 0 < row.metrics["target_prob"] <= 1 and row.metrics["edit_seconds"] > 0
    assert summary["completed"] and summary["edits_done"] == 6 and summary["stopped_at"] is None
    assert_same_weights(model, snapshot)  # every patch of the run reverted exactly

    # the baseline is the unedited model's own score of the same cases
    unedited = evaluate(model, tok, cases, locality_reference(model, tok, cases))
    for name in ("efficacy", "paraphrase", "neighborhood", "reliability", "locality"):
        assert rows[0].metrics[name] == pytest.approx(unedited[name])
        assert summary["final_baseline"][name] == pytest.approx(unedited[name])
    assert summary["final"]["perplexity"] > 0 and "fluency" in summary["final"]


def test_each_aggregate_row_averages_the_edits_made_since_the_last(tiny_editor, cases, monkeypatch):
    made = []  # every edit's own figures, in the order the runner made them
    real_compute = tiny_editor.compute

    def recording_compute(*args, **kwargs):
        result = real_compute(*args, **kwargs)
        made.append(result.diagnostics.figures())
        return result

    monkeypatch.setattr(tiny_editor, "compute", recording_compute)
    plan = EvaluationPlan(protocol="sequential", checkpoint_every=2, fluency=False)
    _, rows = run_evaluation(tiny_editor, cases, plan)
    aggregates = [r for r in rows if r.kind in ("checkpoint", "final")]
    assert [r.edits_done for r in aggregates] == [2, 4, 6] and len(made) == 6
    for number, row in enumerate(aggregates):
        window = made[2 * number : 2 * number + 2]
        for name in ("target_prob", "delta_norm", "edit_seconds"):
            expected = sum(figures[name] for figures in window) / 2
            assert row.metrics[name] == pytest.approx(expected), (row.edits_done, name)


def test_single_and_batch_protocols_edit_from_the_unedited_model(tiny_editor, cases):
    snapshot = weights_snapshot(tiny_editor.model)
    single, rows = run_evaluation(tiny_editor, cases[:3], EvaluationPlan(fluency=False))
    assert single["edits_done"] == 3 and single["errors"] == 0
    per_case = [r for r in rows if r.kind == "case"]
    assert [r.edits_done for r in per_case] == [1, 2, 3]
    assert [r.case_id for r in per_case] == [c.case_id for c in cases[:3]]
    for row in per_case:  # each case beside its own unedited score
        alone = [c for c in cases if c.case_id == row.case_id]
        before = evaluate(tiny_editor.model, tiny_editor.tok, alone)
        assert row.baseline["efficacy"] == before["efficacy"]
    batch, rows = run_evaluation(
        tiny_editor, cases[:4], EvaluationPlan(method="memit", protocol="batch", fluency=False)
    )
    assert [r.edits_done for r in rows if r.kind == "case"] == [4, 4, 4, 4]
    final = rows[-1].metrics  # MEMIT's sweeps and the target distance they left
    assert final["sweeps"] >= 1 and 0 <= final["target_gap_left"] < 1
    assert final["delta_norm"] > 0
    assert batch["plan"]["protocol"] == "batch" and batch["completed"]
    assert_same_weights(tiny_editor.model, snapshot)


def test_a_stopped_run_keeps_its_rows_and_says_where(tiny_editor, cases):
    snapshot = weights_snapshot(tiny_editor.model)
    asked = []

    def stop_on_third_ask() -> bool:
        asked.append(1)
        return len(asked) >= 3

    plan = EvaluationPlan(protocol="sequential", checkpoint_every=1, fluency=False)
    summary, rows = run_evaluation(tiny_editor, cases, plan, should_stop=stop_on_third_ask)
    assert not summary["completed"]
    assert summary["stopped_at"] == "stopped on request after 2 of 6 cases"
    assert [r.kind for r in rows] == ["baseline", "checkpoint", "checkpoint"]
    assert_same_weights(tiny_editor.model, snapshot)


def test_mquake_cases_report_multi_hop_accuracy(tiny_editor):
    import json

    records = json.loads(shared("mquake/mquake-cf-hard.json").read_text())[:2]
    multi = [mquake_case(r) for r in records]
    summary, rows = run_evaluation(tiny_editor, multi, EvaluationPlan(fluency=False))
    cases = [row for row in rows if row.kind == "case"]
    assert len(cases) == 2
    for row in cases:
        assert row.metrics["multi_hop"] in (0.0, 1.0)
    assert {"multi_hop", "multi_hop_original", "efficacy"} <= set(summary["final"])
    assert summary["edits_done"] == 2


def test_none_protocol_only_scores_and_bad_plans_name_the_field(tiny_editor, cases):
    summary, rows = run_evaluation(tiny_editor, cases, EvaluationPlan(protocol="none"))
    assert [r.kind for r in rows] == ["baseline"] and summary["edits_done"] == 0
    assert rows[0].metrics["perplexity"] > 1
    for kwargs, field in (
        ({"protocol": "shuffle"}, "protocol"),
        ({"batch_size": 0}, "batch_size"),
        ({"checkpoint_every": 0}, "checkpoint_every"),
    ):
        with pytest.raises(EditError) as err:
            EvaluationPlan(**kwargs)
        assert err.value.field == field
    with pytest.raises(EditError) as err:
        run_evaluation(tiny_editor, [], EvaluationPlan())
    assert err.value.field == "cases"
