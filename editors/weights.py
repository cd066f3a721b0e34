"""Orientation helpers: methods reason in [out, in]; GPT-2's Conv1D stores [in, out]."""

from __future__ import annotations

import torch

from .model_spec import ModelSpec
from .patch import FactoredDelta


def linear_weight(spec: ModelSpec, weight: torch.Tensor) -> torch.Tensor:
    """The weight as [out, in]."""
    return weight.T if spec.conv1d else weight


def factored(spec: ModelSpec, a: torch.Tensor, b: torch.Tensor) -> FactoredDelta:
    """Update A @ B.T in [out, in] as a delta in the parameter's own layout (fp32 factors)."""
    a, b = a.float().contiguous(), b.float().contiguous()
    return FactoredDelta(b, a) if spec.conv1d else FactoredDelta(a, b)
