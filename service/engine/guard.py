"""The edit guard: before an edit is recorded, measure what its patch does to the model and
refuse it when it damages more than the deployment allows.

Figures, each against the model as it is before the edit (cached per version):
  perplexity_rise    relative rise of the perplexity of a fixed probe text
  canary_changed     share of a fixed canary set's predicted answer tokens that change
  canary_nll_rise    mean rise of the canary answers' token NLL (nats): damage short of a flip
  delta_ratio        largest |delta|_F / |W|_F over the edited matrices
  entropy_drop       relative fall of the n-gram entropy of greedy generations
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from editors.evaluation.probe import PROBE_TEXT
from editors.metrics import fluency, perplexity, score_pairs
from editors.patch import Patch, dense_of

from .weights import WeightSnapshot, WeightState

# General facts no benchmark edit is about: their answers should survive any single edit.
CANARIES: tuple[tuple[str, str], ...] = (
    ("The capital of France is", "Paris"),
    ("Water is made of hydrogen and", "oxygen"),
    ("The largest planet in the solar system is", "Jupiter"),
    ("One, two, three, four,", "five"),
    ("The opposite of hot is", "cold"),
    ("Monday, Tuesday,", "Wednesday"),
    ("The chemical symbol for gold is", "Au"),
    ("Shakespeare wrote Romeo and", "Juliet"),
    ("The sun rises in the", "east"),
    ("Ice is frozen", "water"),
)
FLUENCY_PROMPTS = ("The history of the city", "In the morning, she", "Scientists have found")


@dataclass(frozen=True)
class GuardLimits:
    enabled: bool = True
    max_perplexity_rise: float = 0.2
    max_canary_changed: float = 0.3
    max_canary_nll_rise: float = 0.1
    max_delta_ratio: float = 0.5
    max_entropy_drop: float = 0.3


@dataclass
class GuardReport:
    passed: bool
    figures: dict[str, float]
    reasons: list[str]
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class _Health:
    perplexity: float
    canary_tokens: list[list[int]]
    canary_nll: list[float]
    entropy: float


class EditGuard:
    def __init__(
        self, model: PreTrainedModel, tok: PreTrainedTokenizerBase, limits: GuardLimits
    ) -> None:
        self.model, self.tok, self.limits = model, tok, limits
        self._before: tuple[str, _Health] | None = None  # (checksum, health) of the last version

    def _health(self) -> _Health:
        canaries = score_pairs(self.model, self.tok, list(CANARIES))
        return _Health(
            perplexity(self.model, self.tok, PROBE_TEXT),
            canaries.predicted,
            canaries.nll,
            fluency(self.model, self.tok, list(FLUENCY_PROMPTS), max_new_tokens=16),
        )

    def check(
        self, patch: Patch, weights: WeightState, checksum: str
    ) -> tuple[GuardReport, WeightSnapshot | None]:
        """Apply `patch` on top of the current weights (`checksum`) and measure it. A patch
        that passes stays applied, returned with the snapshot that takes it back (so the
        commit need not apply it a second time); one that fails is taken back here."""
        started = time.perf_counter()
        if self._before is None or self._before[0] != checksum:
            self._before = (checksum, self._health())
        before = self._before[1]
        ratio = max(
            (
                float(torch.linalg.norm(dense_of(delta)))
                / max(float(torch.linalg.norm(weights.params[name].float())), 1e-12)
                for name, delta in patch.deltas.items()
            ),
            default=0.0,
        )
        undo = weights.snapshot()
        try:
            weights.apply(patch)
            after = self._health()
        except BaseException:
            weights.reset_to(undo)
            raise
        changed = sum(
            a != b
            for new, old in zip(after.canary_tokens, before.canary_tokens, strict=True)
            for a, b in zip(new, old, strict=True)
        ) / sum(len(tokens) for tokens in before.canary_tokens)
        figures = {
            "perplexity_before": before.perplexity,
            "perplexity_after": after.perplexity,
            "perplexity_rise": after.perplexity / before.perplexity - 1,
            "canary_changed": changed,
            "canary_nll_rise": sum(after.canary_nll) / len(CANARIES)
            - sum(before.canary_nll) / len(CANARIES),
            "delta_ratio": ratio,
            "entropy_before": before.entropy,
            "entropy_after": after.entropy,
            "entropy_drop": 1 - after.entropy / before.entropy if before.entropy else 0.0,
        }
        limits = self.limits
        reasons = [
            f"{name} {figures[name]:.3f} exceeds {limit}"
            for name, limit in (
                ("perplexity_rise", limits.max_perplexity_rise),
                ("canary_changed", limits.max_canary_changed),
                ("canary_nll_rise", limits.max_canary_nll_rise),
                ("delta_ratio", limits.max_delta_ratio),
                ("entropy_drop", limits.max_entropy_drop),
            )
            if figures[name] > limit
        ]
        if reasons:
            weights.reset_to(undo)
        seconds = time.perf_counter() - started
        report = GuardReport(
            not reasons, {k: round(v, 4) for k, v in figures.items()}, reasons, seconds
        )
        return report, None if reasons else undo
