"""Benchmark records as EditRequests (EasyEdit's CounterFact format)."""

from __future__ import annotations

import json
from pathlib import Path

from .requests import EditRequest


def counterfact_request(record: dict) -> EditRequest:
    """One EasyEdit CounterFact record: prompt, subject, target_new, ground_truth,
    rephrase_prompt, locality_prompt, locality_ground_truth."""
    return EditRequest(
        prompt=record["prompt"],
        subject=record["subject"],
        target_new=record["target_new"],
        target_true=record["ground_truth"],
        paraphrases=(record["rephrase_prompt"],),
        locality=((record["locality_prompt"], record["locality_ground_truth"]),),
        case_id=str(record.get("case_id", "")) or None,
    )


def load_counterfact(path: str | Path, count: int, start: int = 0) -> list[EditRequest]:
    with open(path, encoding="utf-8") as handle:
        records = json.load(handle)[start : start + count]
    return [counterfact_request(r) for r in records]
