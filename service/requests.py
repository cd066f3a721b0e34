"""Edit requests as the ledger stores them (JSON) and as the editors take them."""

from __future__ import annotations

from typing import Any

from editors.requests import EditRequest


def request_record(request: EditRequest) -> dict[str, Any]:
    return {
        "prompt": request.prompt,
        "subject": request.subject,
        "target_new": request.target_new,
        "target_true": request.target_true,
        "paraphrases": list(request.paraphrases),
        "locality": [list(pair) for pair in request.locality],
        "portability": [list(pair) for pair in request.portability],
        "case_id": request.case_id,
    }


def request_from_record(record: dict[str, Any]) -> EditRequest:
    return EditRequest(
        prompt=record["prompt"],
        subject=record["subject"],
        target_new=record["target_new"],
        target_true=record.get("target_true"),
        paraphrases=tuple(record.get("paraphrases") or ()),
        locality=tuple(tuple(pair) for pair in record.get("locality") or ()),  # type: ignore[misc]
        portability=tuple(tuple(pair) for pair in record.get("portability") or ()),  # type: ignore[misc]
        case_id=record.get("case_id"),
    )
