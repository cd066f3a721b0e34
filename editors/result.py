"""What an editing method returns."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
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


@dataclass
class EditResult:
    patch: Patch
    diagnostics: Diagnostics
