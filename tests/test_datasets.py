"""Loading the real benchmark files in ../shared/data, and clear errors for bad ones."""

from __future__ import annotations

import json

import pytest

from editors.datasets import DatasetError, MultiHopCase, load_cases
from editors.requests import EditRequest

from .conftest import shared


@pytest.mark.parametrize(
    ("path", "dataset", "records"),
    [
        ("counterfact/counterfact-val.json", "counterfact", 1919),
        ("zsre/zsre-eval-portability.json", "zsre", 1037),
        ("zsre/zsre-train-1k.json", "zsre", 1000),
        ("knowedit/zsre-test-all.json", "knowedit", 1304),
        ("knowedit/wiki-counterfact-test.jsonl", "knowedit", 885),
        ("knowedit/wiki-counterfact-train.json", "knowedit", 1428),
        ("knowedit/wiki-recent-train.json", "knowedit", 570),
        ("mquake/mquake-cf-hard.json", "mquake", 429),
    ],
)
def test_every_record_of_the_real_files_loads(path, dataset, records):
    problems: list[DatasetError] = []
    cases = load_cases(shared(path), problems=problems)  # the format is detected
    assert len(cases) + len(problems) == records
    # a few real records have no new answer, or a prompt that misspells its subject
    assert len(problems) <= records // 100
    assert all(p.field in ("target_new", "prompt") and "record" in str(p) for p in problems)
    assert cases == load_cases(shared(path), dataset, problems=[])
    if dataset == "mquake":
        assert all(isinstance(c, MultiHopCase) and 1 <= len(c.requests) <= 4 for c in cases)
        assert all(c.questions and c.new_answer for c in cases)
        return
    assert all(isinstance(c, EditRequest) and c.target_new.strip() for c in cases)
    assert all("{}" in c.prompt for c in cases)  # the subject was found in every prompt
    if path.startswith("zsre/zsre-eval") or path == "knowedit/zsre-test-all.json":
        assert sum(bool(c.portability) for c in cases) > records // 2
    if dataset in ("counterfact", "zsre"):
        assert all(c.locality and c.paraphrases for c in cases)


def test_a_zsre_record_maps_its_fields(tmp_path):
    (case,) = load_cases(shared("zsre/zsre-eval-portability.json"), count=1)
    record = json.loads(shared("zsre/zsre-eval-portability.json").read_text())[0]
    assert case.text == record["src"] and case.target_new == record["alt"]
    assert case.locality[0] == (record["loc"].removeprefix("nq question: "), record["loc_ans"])
    assert case.portability[0][1] == record["portability"]["New Answer"]


def test_a_real_record_without_a_new_answer_is_named(tmp_path):
    with pytest.raises(DatasetError, match=r"zsre-train-1k.json: record 534: target_new is empty"):
        load_cases(shared("zsre/zsre-train-1k.json"))


def test_bad_files_and_records_name_the_file_record_and_field(tmp_path):
    with pytest.raises(DatasetError, match=r"wikibio-test.json: record 0 is in none") as found:
        load_cases(shared("knowedit/wikibio-test.json"))
    assert found.value.field == "path"
    good = {"prompt": "{} is in", "subject": "Paris", "target_new": "Asia"}
    missing = tmp_path / "missing.json"
    missing.write_text(json.dumps([good, {"prompt": "{} is in", "target_new": "Asia"}]))
    with pytest.raises(DatasetError, match=r"missing.json: record 1: missing field 'subject'"):
        load_cases(missing)
    no_subject = tmp_path / "subject.jsonl"
    no_subject.write_text(json.dumps(good) + "\n" + json.dumps({**good, "prompt": "Rome is"}))
    with pytest.raises(DatasetError, match=r"record 1: prompt 'Rome is' contains neither") as err:
        load_cases(no_subject)
    assert err.value.field == "prompt"
    broken = tmp_path / "broken.json"
    broken.write_text("[{not json")
    with pytest.raises(DatasetError, match="neither JSON nor JSON lines"):
        load_cases(broken)
    with pytest.raises(DatasetError, match="unknown dataset 'squad'") as err:
        load_cases(missing, "squad")
    assert err.value.field == "dataset"
    with pytest.raises(DatasetError, match="cannot be read"):
        load_cases(tmp_path / "nowhere.json")
