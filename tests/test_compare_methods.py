"""bench/compare_methods.py on the tiny GPT-2: the JSON it writes per method, that a later
invocation keeps the methods it does not rerun, that a stop leaves valid JSON, and the
README table rendered from it."""

from __future__ import annotations

import json
import os
import signal

import pytest

from bench import compare_methods
from editors.methods import METHODS

COUNT = 2


@pytest.fixture
def run(tmp_path, tiny_model_dir, corpus_file, monkeypatch):
    monkeypatch.setenv("EDITSERVE_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "comparison.json"

    def invoke(*methods: str) -> dict:
        compare_methods.main(
            [
                "--dataset",
                "counterfact",
                "--count",
                str(COUNT),
                "--model",
                str(tiny_model_dir),
                "--corpus",
                str(corpus_file),
                "--samples",
                "500",
                "--checkpoint-every",
                "1",
                "--out",
                str(out),
                "--methods",
                *methods,
            ]
        )
        return json.loads(out.read_text())

    return invoke


def test_every_method_is_compared_by_default_rome_first():
    names = compare_methods.default_methods()
    assert names[0] == "rome"
    assert sorted(names) == sorted(METHODS)


def test_each_method_gets_its_figures_and_a_later_run_adds_to_them(run):
    report = run("rome")
    (rome,) = report["methods"]
    assert rome["completed"] and rome["edited"] == rome["scored"] == COUNT
    assert rome["refused"] == 0 and rome["free_generation_misses"]["free_rewrite"] is not None
    assert rome["metrics"]["reliability"] is not None
    assert "free_rewrite" in rome["metrics"] and "free_paraphrase" in rome["metrics"]
    assert rome["seconds_per_edit"]["median"] > 0
    assert rome["peak_rss_mb"] > 0 and rome["peak_rss_measures"]
    assert rome["hparams"]["lr"] is not None
    # the first two edit cases: a generation prompt ("Where Danielle Darrieux is from, ..."),
    # then a paraphrase prompt after a generated sentence; each case has one rephrase
    kinds = rome["free_paraphrase_by_prompt_kind"]
    assert kinds["generation_prompts"]["cases"] == kinds["paraphrase_prompts"]["cases"] == 1
    split = [kinds[k]["free_paraphrase"] for k in ("generation_prompts", "paraphrase_prompts")]
    assert sum(split) / 2 == pytest.approx(rome["metrics"]["free_paraphrase"])
    assert report["baseline"]["efficacy"] is not None
    assert {"command", "commit", "date", "machine"} <= set(report["provenance"])

    report = run("grace")
    assert [m["method"] for m in report["methods"]] == ["rome", "grace"]
    assert report["methods"][0] == rome  # kept as it was
    table = compare_methods.markdown_table(report)
    lines = table.splitlines()
    assert lines[2].startswith("| unedited | 2 |")
    assert lines[3].startswith("| rome | 2 |") and lines[4].startswith("| grace | 2 |")
    assert all(line.count("|") == lines[0].count("|") for line in lines)


def test_a_stopped_run_leaves_valid_json_saying_so(run, monkeypatch):
    real = compare_methods.run_method
    asks = []

    def stopping(editor, cases, method, every, fluency, should_stop, on_progress):
        def ask() -> bool:  # a SIGTERM arrives while the first case is scored
            asks.append(method)
            if len(asks) == 2:
                os.kill(os.getpid(), signal.SIGTERM)
            return should_stop()

        return real(editor, cases, method, every, fluency, ask, on_progress)

    monkeypatch.setattr(compare_methods, "run_method", stopping)
    before = signal.getsignal(signal.SIGTERM)
    report = run("rome", "memit")
    (rome,) = report["methods"]  # memit never started
    assert not rome["completed"] and rome["edited"] == rome["scored"] == 1
    assert "stopped" in rome["stopped_at"]
    assert rome["metrics"]["reliability"] is not None  # the checkpoint after the first case
    assert "cut off" in compare_methods.markdown_table(report)
    assert signal.getsignal(signal.SIGTERM) == before  # the handler was given back
