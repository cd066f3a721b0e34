"""The summary of an evaluation run, from its rows (the same for a finished run and for one
rebuilt from the rows it left)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .plan import EvaluationRow


def summarize(
    plan: dict[str, Any],
    cases: int,
    rows: Sequence[EvaluationRow],
    stopped_at: str | None,
    seconds: dict[str, float] | None = None,
) -> dict[str, Any]:
    """`stopped_at` is None for a run that completed, else where and why it stopped."""
    last = next((r for r in reversed(rows) if r.kind in ("final", "checkpoint")), None)
    baseline = next((r for r in rows if r.kind == "baseline"), None)
    return {
        "plan": plan,
        "cases": cases,
        "edits_done": max((r.edits_done for r in rows), default=0),
        "errors": sum(1 for r in rows if r.kind == "case" and r.error),
        "completed": stopped_at is None,
        "stopped_at": stopped_at,
        "baseline": baseline.metrics if baseline else None,
        "final": last.metrics if last else None,
        "final_baseline": last.baseline if last else None,
        "checkpoints": [
            {"edits_done": r.edits_done, "metrics": r.metrics, "baseline": r.baseline}
            for r in rows
            if r.kind == "checkpoint"
        ],
        "seconds": {k: round(v, 3) for k, v in (seconds or {}).items()},
    }
