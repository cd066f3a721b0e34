"""From a wanted change of the residual stream to a wanted change of the MLP output.

Most families add the MLP output to the residual stream directly, so the two are equal.
Gemma 3 normalises the MLP output first (post-feedforward RMSNorm, scale (1 + w)); as the
norm ignores the input's scale we invert it and keep the original output's RMS.
"""

from __future__ import annotations

import torch
from torch import nn

from ..model_spec import ModelSpec, get_module


@torch.no_grad()
def mlp_output_change(
    model: nn.Module,
    spec: ModelSpec,
    layer: int,
    mlp_out: torch.Tensor,
    residual_change: torch.Tensor,
) -> torch.Tensor:
    """mlp_out [n, d]: current MLP outputs; residual_change [n, d] -> MLP output change."""
    if spec.mlp_post_norm is None:
        return residual_change
    norm = get_module(model, f"{spec.layer_path(layer)}.{spec.mlp_post_norm}")
    scale = spec.post_norm_offset + norm.weight.float()
    scale = torch.where(scale.abs() < 1e-3, torch.full_like(scale, 1e-3), scale)
    wanted = norm(mlp_out.to(norm.weight.dtype)).float() + residual_change
    direction = wanted / scale
    rms_old = mlp_out.float().pow(2).mean(-1, keepdim=True).sqrt()
    rms_new = direction.pow(2).mean(-1, keepdim=True).sqrt().clamp_min(1e-12)
    return direction * (rms_old / rms_new) - mlp_out.float()
