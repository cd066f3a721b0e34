"""Benchmark files as edit cases: EasyEdit CounterFact, MEND/EasyEdit ZsRE, KnowEdit and
MQuAKE-CF, detected from their fields. A malformed record raises `DatasetError` naming the
file, the record and the field."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import EditError
from .requests import EditRequest

FORMATS = ("counterfact", "zsre", "knowedit", "mquake")


class DatasetError(EditError):
    """A dataset file or record is not in a known format; `record` is the bad record's
    index, where one is to blame."""

    record: int | None = None


@dataclass(frozen=True)
class MultiHopCase:
    """MQuAKE: several edits, then multi-hop questions whose answer follows from them."""

    case_id: str
    requests: tuple[EditRequest, ...]
    questions: tuple[str, ...]
    answer: str  # before the edits
    new_answer: str  # after them
    new_answer_aliases: tuple[str, ...] = ()


def _first(value: Any) -> str:
    """A ground truth may be a string, a list of strings, or a list of alias lists (some of
    them empty): the first string found."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        for item in value:
            try:
                return _first(item)
            except TypeError:
                continue
    raise TypeError


def _pairs(groups: Any) -> tuple[tuple[str, str], ...]:
    """KnowEdit's {name: [{prompt, ground_truth}, ...]} (or one dict per name) as pairs;
    an item with no answer at all is left out."""
    pairs = []
    for items in (groups or {}).values():
        for item in items if isinstance(items, list) else [items]:
            try:
                pairs.append((item["prompt"], _first(item["ground_truth"])))
            except TypeError:
                continue
    return tuple(pairs)


def counterfact_request(record: dict) -> EditRequest:
    """EasyEdit CounterFact: prompt, subject, target_new, ground_truth, rephrase_prompt,
    locality_prompt, locality_ground_truth."""
    return EditRequest(
        prompt=record["prompt"],
        subject=record["subject"],
        target_new=record["target_new"],
        target_true=record["ground_truth"],
        paraphrases=(record["rephrase_prompt"],),
        locality=((record["locality_prompt"], record["locality_ground_truth"]),),
        case_id=str(record.get("case_id", "")) or None,
    )


def zsre_request(record: dict) -> EditRequest:
    """MEND/EasyEdit ZsRE: subject, src (question), alt (new answer), answers, rephrase,
    loc ("nq question: ..."), loc_ans, and optionally EasyEdit's portability question."""
    portability = ()
    if record.get("portability"):
        port = record["portability"]
        portability = ((port["New Question"], port["New Answer"]),)
    return EditRequest(
        prompt=record["src"],
        subject=record["subject"],
        target_new=record["alt"],
        target_true=_first(record["answers"]) if record.get("answers") else None,
        paraphrases=(record["rephrase"],) if record.get("rephrase") else (),
        locality=((record["loc"].removeprefix("nq question: "), record["loc_ans"]),),
        portability=portability,
        case_id=str(record["case_id"]) if "case_id" in record else None,
    )


def knowedit_request(record: dict) -> EditRequest:
    """KnowEdit: subject, prompt, target_new, ground_truth, rephrase_prompt, locality{},
    portability{}."""
    truth = record.get("ground_truth")
    return EditRequest(
        prompt=record["prompt"],
        subject=record["subject"],
        target_new=record["target_new"],
        target_true=_first(truth) if truth else None,
        paraphrases=(record["rephrase_prompt"],) if record.get("rephrase_prompt") else (),
        locality=_pairs(record.get("locality")),
        portability=_pairs(record.get("portability")),
        case_id=str(record["case_id"]) if "case_id" in record else None,
    )


def mquake_case(record: dict) -> MultiHopCase:
    requests = tuple(
        EditRequest(
            prompt=rewrite["prompt"],
            subject=rewrite["subject"],
            target_new=rewrite["target_new"]["str"],
            target_true=rewrite["target_true"]["str"],
        )
        for rewrite in record["requested_rewrite"]
    )
    return MultiHopCase(
        case_id=str(record["case_id"]),
        requests=requests,
        questions=tuple(record["questions"]),
        answer=record["answer"],
        new_answer=record["new_answer"],
        new_answer_aliases=tuple(record.get("new_answer_alias", ())),
    )


_READERS = {
    "counterfact": counterfact_request,
    "zsre": zsre_request,
    "knowedit": knowedit_request,
    "mquake": mquake_case,
}


def detect_format(record: dict) -> str:
    if "requested_rewrite" in record:
        return "mquake"
    if "src" in record and "alt" in record:
        return "zsre"
    if "locality_prompt" in record:
        return "counterfact"
    if "target_new" in record and "prompt" in record:
        return "knowedit"
    raise KeyError


def read_records(path: str | Path) -> list[dict]:
    """A JSON array, or JSON lines."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise DatasetError(f"{path}: cannot be read ({exc.strerror})", field="path") from exc
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        try:
            data = [json.loads(line) for line in text.splitlines() if line.strip()]
        except json.JSONDecodeError as exc:
            message = f"{path}: neither JSON nor JSON lines (line {exc.lineno}: {exc.msg})"
            raise DatasetError(message, field="path") from exc
    if isinstance(data, dict):
        data = [data]
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise DatasetError(f"{path}: expected a list of JSON objects", field="path")
    return data


def load_cases(
    path: str | Path,
    dataset: str | None = None,
    count: int | None = None,
    start: int = 0,
    problems: list[DatasetError] | None = None,
) -> list[Any]:
    """Cases from a benchmark file: EditRequests, or MultiHopCases for MQuAKE.

    `dataset` is one of FORMATS; without it the first record's fields decide. A malformed
    record raises, unless a `problems` list is given: then it is skipped and its error added.
    """
    check_format(dataset)
    records = read_records(path)[start : None if count is None else start + count]
    return cases_from_records(records, dataset, str(path), start, problems, source_field="path")


def check_format(dataset: str | None) -> None:
    if dataset is not None and dataset not in _READERS:
        raise DatasetError(f"unknown dataset {dataset!r}; known: {list(FORMATS)}", field="dataset")


def cases_from_records(
    records: list[Any],
    dataset: str | None = None,
    source: str = "upload",
    start: int = 0,
    problems: list[DatasetError] | None = None,
    source_field: str = "records",
) -> list[Any]:
    """`load_cases` on records already read (an upload); `source` names them in errors and
    `source_field` is the field an unrecognised format is blamed on."""
    check_format(dataset)
    if not records:
        return []
    for index, record in enumerate(records, start=start):
        if not isinstance(record, dict):
            raise DatasetError(f"{source}: record {index} is not a JSON object", field=source_field)
    if dataset is None:
        try:
            dataset = detect_format(records[0])
        except KeyError:
            raise DatasetError(
                f"{source}: record {start} is in none of the formats {list(FORMATS)} "
                f"(its fields: {sorted(records[0])})",
                field=source_field,
            ) from None
    reader = _READERS[dataset]
    cases = []
    for index, record in enumerate(records, start=start):
        try:
            cases.append(_read(reader, record, source, index, dataset))
        except DatasetError as exc:
            if problems is None:
                raise
            problems.append(exc)
    return cases


def _read(reader: Any, record: dict, path: str | Path, index: int, dataset: str) -> Any:
    try:
        return _read_one(reader, record, path, index, dataset)
    except DatasetError as exc:
        exc.record = index
        raise


def _read_one(reader: Any, record: dict, path: str | Path, index: int, dataset: str) -> Any:
    try:
        return reader(record)
    except KeyError as exc:
        raise DatasetError(
            f"{path}: record {index}: missing field {exc.args[0]!r} ({dataset} format)",
            field=str(exc.args[0]),
        ) from None
    except (TypeError, AttributeError):
        raise DatasetError(
            f"{path}: record {index}: a field has the wrong type ({dataset} format)",
            field="record",
        ) from None
    except EditError as exc:
        raise DatasetError(f"{path}: record {index}: {exc}", field=exc.field) from None


def load_counterfact(path: str | Path, count: int, start: int = 0) -> list[EditRequest]:
    return load_cases(path, "counterfact", count, start)
