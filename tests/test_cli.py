"""`editserve edit` end to end on a local model folder, and its bad-input exit."""

from __future__ import annotations

import json

import pytest

from service.cli import main

from .conftest import counterfact


def test_edit_prints_answers_before_and_after(
    fact_model_folder, fact_facts, corpus_file, tmp_path, capsys
):
    fact = fact_facts[0]
    code = main(
        [
            "edit",
            "--model",
            str(fact_model_folder),
            "--prompt",
            fact["prompt"],
            "--subject",
            fact["subject"],
            "--target",
            fact["target_new"],
            "--corpus",
            str(corpus_file),
            "--samples",
            "2000",
            "--cache-dir",
            str(tmp_path),
            "--max-new-tokens",
            "2",
            "--set",
            "steps=10",
        ]
    )
    out = capsys.readouterr()
    assert code == 0
    before, after = (
        line for line in out.out.splitlines() if line.startswith(("before:", "after:"))
    )
    assert fact["ground_truth"] in before
    assert after.startswith("after:")
    summary = json.loads(out.out[out.out.index("{") :])
    assert summary["method"] == "rome" and summary["steps"] <= 10
    assert summary["prob_after"][0] > summary["prob_before"][0]
    assert len(summary["patch_sha256"]) == 64
    assert "statistics" in out.err  # progress bars go to stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--prompt", "No subject here", "--subject", "Paris"], "prompt"),
        (["--target", " "], "target_new"),
    ],
)
def test_bad_request_exits_2_before_loading_anything(args, message, capsys, tmp_path):
    code = main(["edit", "--model", str(tmp_path / "never-loaded"), *args])
    assert code == 2
    assert message in capsys.readouterr().err


def test_unknown_hyperparameter_is_refused(fact_model_folder, corpus_file, tmp_path, capsys):
    code = main(
        [
            "edit",
            "--model",
            str(fact_model_folder),
            "--prompt",
            "{} plays the",
            "--subject",
            "Toko",
            "--target",
            "piano",
            "--corpus",
            str(corpus_file),
            "--samples",
            "500",
            "--cache-dir",
            str(tmp_path),
            "--set",
            "nonsense=1",
        ]
    )
    assert code == 2
    assert "nonsense" in capsys.readouterr().err


def test_eval_writes_json_csv_and_report(tiny_model_dir, corpus_file, tmp_path, capsys):
    cases = tmp_path / "cases.json"
    cases.write_text(json.dumps(counterfact("train", 4)))
    out = tmp_path / "run"
    code = main(
        [
            "eval",
            "--file",
            str(cases),
            "--model",
            str(tiny_model_dir),
            "--corpus",
            str(corpus_file),
            "--samples",
            "2000",
            "--cache-dir",
            str(tmp_path / "cache"),
            "--protocol",
            "sequential",
            "--batch-size",
            "2",
            "--checkpoint-every",
            "2",
            "--no-fluency",
            "--out",
            str(out),
        ]
    )
    captured = capsys.readouterr()
    assert code == 0, captured.err
    summary = json.loads(captured.out)
    assert summary["edits_done"] == 4 and summary["completed"]
    saved = json.loads((out / "results.json").read_text())
    assert saved["summary"]["final"] == summary["final"]
    assert [r["kind"] for r in saved["rows"]].count("case") == 4
    assert (out / "results.csv").read_text().startswith("kind,edits_done,case_id,error,")
    assert "<svg" in (out / "report.html").read_text()
    assert "sequential rome on 4 cases" in captured.err  # the progress bar
    streamed = [json.loads(line) for line in (out / "rows.jsonl").read_text().splitlines()]
    assert streamed == saved["rows"]  # every row was written as it was measured
    assert [r["kind"] for r in streamed if r["kind"] != "case"] == [
        "baseline",
        "checkpoint",
        "final",
    ]
    line = next(t for t in captured.err.splitlines() if t.startswith("checkpoint after 2 edits: "))
    assert "efficacy" in line and "perplexity" in line


def test_eval_names_the_bad_record(tmp_path, capsys):
    cases = tmp_path / "cases.json"
    good = {"prompt": "{} is in", "subject": "Rome", "target_new": "Asia"}
    cases.write_text(json.dumps([good, {"prompt": "{} is in", "subject": "Rome"}]))
    assert main(["eval", "--file", str(cases)]) == 2
    assert "record 1: missing field 'target_new'" in capsys.readouterr().err
    assert main(["eval", "--dataset", "counterfact", "--split", "nope"]) == 2
    assert "no split 'nope'" in capsys.readouterr().err


def test_eval_stopped_by_sigterm_writes_what_it_measured(tiny_model_dir, corpus_file, tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    cases = tmp_path / "cases.json"
    cases.write_text(json.dumps(counterfact("train", 60)))
    out = tmp_path / "run"
    args = [
        sys.executable, "-m", "service.cli", "eval", "--file", str(cases), "-n", "60",
        "--model", str(tiny_model_dir), "--corpus", str(corpus_file), "--samples", "2000",
        "--cache-dir", str(tmp_path / "cache"), "--no-fluency", "--out", str(out),
    ]  # fmt: skip
    process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    seen = b""
    while b"optimise" not in seen:  # the progress bar shows edits under way
        assert time.monotonic() < deadline and process.poll() is None, seen[-2000:]
        seen += os.read(process.stderr.fileno(), 4096)
    process.send_signal(signal.SIGTERM)
    stdout, _ = process.communicate(timeout=300)
    assert process.returncode == 1  # stopped, not completed
    summary = json.loads(stdout)
    assert not summary["completed"] and summary["edits_done"] < 60
    assert summary["stopped_at"].startswith("stopped on request after")
    saved = json.loads((out / "results.json").read_text())
    assert [r["kind"] for r in saved["rows"]].count("case") == summary["edits_done"]
    assert "did not complete" in (out / "report.html").read_text()


def test_corpus_writes_the_true_facts_of_a_tuning_split(tmp_path, capsys):
    """`editserve corpus` states each case's true answer and its locality answer, never the
    counterfactual one, in blank-line separated paragraphs the statistics read."""
    out = tmp_path / "facts.txt"
    assert main(["corpus", "--dataset", "counterfact", "--split", "train", "--out", str(out)]) == 0
    records = counterfact("train", 10_000)
    assert f"wrote {2 * len(records)} facts" in capsys.readouterr().out
    text = out.read_text()
    first = records[0]
    assert f"{first['prompt']} {first['ground_truth']}." in text
    assert f"{first['locality_prompt']} {first['locality_ground_truth']}." in text
    assert f"{first['prompt']} {first['target_new']}." not in text
    assert len(text.split("\n\n")) == len(records) * 2 // 8
    assert main(["corpus", "--dataset", "nope", "--out", str(out)]) == 2
    assert "unknown dataset 'nope'" in capsys.readouterr().err
    assert main(["corpus", "--dataset", "mquake", "--split", "hard", "--out", str(out)]) == 2
    assert "mquake cases are not single facts" in capsys.readouterr().err
    missing = tmp_path / "no-such-folder" / "facts.txt"
    assert main(["corpus", "--out", str(missing)]) == 2
    assert f"cannot write {missing}" in capsys.readouterr().err
