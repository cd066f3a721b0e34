"""The edit guard: before an edit is recorded, measure what its patch does to the model and
refuse it when it damages more than the deployment allows.

Figures, each against the model as it is before the edit (the health a passing edit
measures after itself is the next edit's before, so each edit costs one measurement):
  perplexity_rise    relative rise of the perplexity of a fixed probe text
  canary_changed     share of a fixed canary set's predicted answer tokens that change
  canary_nll_rise    mean rise of the canary answers' token NLL (nats): damage short of a flip
  delta_ratio        largest |delta|_F / |W|_F over the edited matrices
  entropy_drop       relative fall of the n-gram entropy of greedy generations
and the same against the base weights (`total_*`, with limits of their own), so a run of
edits each just under the per-edit limits cannot drift the model away step by step.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, TypeVar

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from editors.evaluation.probe import PROBE_TEXT
from editors.metrics import fluency, perplexity, score_pairs
from editors.patch import Patch, dense_of
from editors.weight_state import WeightSnapshot, WeightState

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
# A decoding step costs a read of every weight whatever the batch, so the continuations'
# length is most of the guard's time: 8 tokens cost half of 16. Eight tokens hold only a
# few 2- and 3-grams, so this probe sees repetition that starts early; whether it catches
# as much as 16 tokens did has not been measured (the perplexity and canary checks do not
# depend on it).
FLUENCY_TOKENS = 8


T = TypeVar("T")


@dataclass(frozen=True)
class GuardLimits:
    enabled: bool = True
    max_perplexity_rise: float = 0.2
    max_canary_changed: float = 0.3
    max_canary_nll_rise: float = 0.1
    max_delta_ratio: float = 0.5
    max_entropy_drop: float = 0.3
    # against the base weights: what all the live edits together may do
    max_total_perplexity_rise: float = 0.5
    max_total_canary_changed: float = 0.5
    max_total_canary_nll_rise: float = 0.5
    max_total_delta_ratio: float = 1.0
    max_total_entropy_drop: float = 0.5

    def checks(self) -> list[tuple[str, float]]:
        """(figure, limit) pairs, per edit then cumulative."""
        names = ("perplexity_rise", "canary_changed", "canary_nll_rise", "delta_ratio")
        names += ("entropy_drop",)
        return [(n, getattr(self, f"max_{n}")) for n in names] + [
            (f"total_{n}", getattr(self, f"max_total_{n}")) for n in names
        ]


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
        self,
        model: PreTrainedModel,
        tok: PreTrainedTokenizerBase,
        limits: GuardLimits,
        on_base: Callable[[Callable[[], Any]], Any],
    ) -> None:
        """`on_base(work)` runs `work` on the base weights and puts the current ones back."""
        self.model, self.tok, self.limits, self.on_base = model, tok, limits, on_base
        self._before: tuple[str, _Health] | None = None  # (checksum, health) of the last version
        self._base: _Health | None = None

    def _health(self) -> _Health:
        canaries = score_pairs(self.model, self.tok, list(CANARIES))
        return _Health(
            perplexity(self.model, self.tok, PROBE_TEXT),
            canaries.predicted,
            canaries.nll,
            fluency(self.model, self.tok, list(FLUENCY_PROMPTS), max_new_tokens=FLUENCY_TOKENS),
        )

    def check(
        self, patch: Patch, weights: WeightState, checksum: str
    ) -> tuple[GuardReport, WeightSnapshot | None]:
        """Apply `patch` on top of the current weights (`checksum`) and measure it. A patch
        that passes stays applied, returned with the snapshot that takes it back (so the
        commit need not apply it a second time); one that fails is taken back here."""
        started = time.perf_counter()
        if self._base is None:
            self._base = self.on_base(self._health)
        if self._before is None or self._before[0] != checksum:
            self._before = (checksum, self._health())
        before, base = self._before[1], self._base
        ratio = max(
            (
                float(torch.linalg.norm(dense_of(delta)))
                / max(float(torch.linalg.norm(weights.params[name].detach().float())), 1e-12)
                for name, delta in patch.deltas.items()
            ),
            default=0.0,
        )
        undo = weights.snapshot()
        try:
            weights.apply(patch)
            after = self._health()
            total_ratio = weights.drift(patch.parameter_names)
        except BaseException:
            weights.reset_to(undo)
            raise
        figures = {
            "perplexity_before": before.perplexity,
            "perplexity_after": after.perplexity,
            "entropy_before": before.entropy,
            "entropy_after": after.entropy,
            "perplexity_base": base.perplexity,
            **_damage(before, after, ratio),
            **{f"total_{k}": v for k, v in _damage(base, after, total_ratio).items()},
        }
        reasons = [
            f"{name} {figures[name]:.3f} exceeds {limit}"
            for name, limit in self.limits.checks()
            if figures[name] > limit
        ]
        if reasons:
            weights.reset_to(undo)
        else:  # the weights this edit makes are the next edit's "before": measured once
            self._before = (weights.checksum(), after)
        seconds = time.perf_counter() - started
        report = GuardReport(
            not reasons, {k: round(v, 4) for k, v in figures.items()}, reasons, seconds
        )
        return report, None if reasons else undo


def _damage(before: _Health, after: _Health, delta_ratio: float) -> dict[str, float]:
    changed = sum(
        a != b
        for new, old in zip(after.canary_tokens, before.canary_tokens, strict=True)
        for a, b in zip(new, old, strict=True)
    ) / sum(len(tokens) for tokens in before.canary_tokens)
    return {
        "perplexity_rise": after.perplexity / before.perplexity - 1,
        "canary_changed": changed,
        "canary_nll_rise": (sum(after.canary_nll) - sum(before.canary_nll)) / len(CANARIES),
        "delta_ratio": delta_ratio,
        "entropy_drop": 1 - after.entropy / before.entropy if before.entropy else 0.0,
    }
