"""What an editing method returns."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from statistics import fmean
from typing import Any

from .patch import Patch


@dataclass
class Diagnostics:
    method: str
    layers: list[int]
    steps: int = 0
    losses: list[float] = field(default_factory=list)
    prob_before: list[float] = field(default_factory=list)  # P(target_new), one per request
    prob_after: list[float] = field(default_factory=list)
    delta_norms: dict[str, float] = field(default_factory=dict)
    prefixes: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)  # time per stage
    extra: dict[str, Any] = field(default_factory=dict)  # method-specific figures

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def figures(self) -> dict[str, float]:
        """The edit's reach in a few numbers: P(target) where the value optimisation stopped
        and the share of the target distance the layer sweeps left (means over the requests),
        the sweeps made, the largest |delta| of a changed parameter, and the seconds the edit
        took (each where the method reports it)."""
        out: dict[str, float] = {}
        if "total" in self.seconds:
            out["edit_seconds"] = self.seconds["total"]
        if self.prob_after:
            out["target_prob"] = fmean(self.prob_after)
        if self.extra.get("target_gap_left"):
            out["target_gap_left"] = fmean(self.extra["target_gap_left"])
        if "sweeps" in self.extra:
            out["sweeps"] = float(self.extra["sweeps"])
        if self.delta_norms:
            out["delta_norm"] = max(self.delta_norms.values())
        return out


@dataclass
class EditResult:
    patch: Patch
    diagnostics: Diagnostics
