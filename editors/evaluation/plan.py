"""What an evaluation run does (`EvaluationPlan`) and what it records (`EvaluationRow`)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from ..errors import EditError

Protocol = Literal["none", "single", "batch", "sequential"]
PROTOCOLS: tuple[str, ...] = ("none", "single", "batch", "sequential")
RowKind = Literal["baseline", "case", "checkpoint", "final"]


class EvaluationStopped(Exception):
    """The caller asked the run to stop; the rows recorded so far stand."""


@dataclass(frozen=True)
class EvaluationPlan:
    """How to edit and when to measure.

    protocol:
      none        score the unedited model only
      single      each group of `batch_size` cases edited from the unedited model, scored,
                  then rolled back (batch_size 1: every case alone)
      batch       the same with one group of all cases unless `batch_size` is set
      sequential  groups of `batch_size` edited one after another and never rolled back;
                  every case edited so far is scored each `checkpoint_every` edits and at
                  the end (where locate-then-edit methods collapse)
    """

    method: str = "rome"
    protocol: Protocol = "single"
    batch_size: int | None = None
    checkpoint_every: int | None = None
    hparams: dict[str, Any] = field(default_factory=dict)
    fluency: bool = True
    fluency_prompts: int = 4
    fluency_tokens: int = 32

    def __post_init__(self) -> None:
        if self.protocol not in PROTOCOLS:
            raise EditError(
                f"unknown protocol {self.protocol!r}; known: {list(PROTOCOLS)}", field="protocol"
            )
        for name in ("batch_size", "checkpoint_every"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise EditError(f"{name} must be at least 1", field=name)

    def group_size(self, cases: int) -> int:
        if self.batch_size is not None:
            return self.batch_size
        return max(cases, 1) if self.protocol == "batch" else 1

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class EvaluationRow:
    """One measurement: `metrics` of the model after `edits_done` edits, beside the same
    metrics of the unedited model on the same cases (`baseline`).

    kind: baseline (the unedited model on all cases), case (one case), checkpoint (the
    cases edited so far, in the middle of a run), final (all cases at the end). Checkpoint
    and final rows also carry the mean reach of the edits computed since the previous such
    row (target_prob, target_gap_left, sweeps, delta_norm, edit_seconds: Diagnostics.figures).
    """

    kind: RowKind
    edits_done: int
    metrics: dict[str, float | None]
    baseline: dict[str, float | None] | None = None
    case_id: str | None = None
    error: str | None = None
    # case rows: subject, prompt, target_new and the model's greedy answer before and after
    answers: dict[str, str] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
