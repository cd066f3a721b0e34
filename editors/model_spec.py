"""Where each model family keeps the parts a locate-then-edit method touches.

A `ModelSpec` is detected from `config.model_type` (never from a model's name) and can be
overridden by passing one explicitly. Paths use `{}` for the layer index.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn

from .errors import UnsupportedModelError


@dataclass(frozen=True)
class ModelSpec:
    """Module paths of one architecture family.

    - `layers`: the ModuleList of decoder blocks.
    - `mlp_out`: the MLP's output projection; its *input* is the key k, its output the value.
    - `conv1d`: True where weights are stored transposed ([in, out], GPT-2's Conv1D).
    - `mlp_post_norm`: a norm applied to the MLP output before it joins the residual
      stream (Gemma 3); None where the MLP output is added to the residual directly.
    - `post_norm_offset`: the norm computes `x / rms(x) * (offset + weight)`.
    """

    family: str
    layers: str
    mlp_out: str
    conv1d: bool = False
    mlp_post_norm: str | None = None
    post_norm_offset: float = 0.0

    def layer_path(self, layer: int) -> str:
        return f"{self.layers}.{layer}"

    def mlp_out_path(self, layer: int) -> str:
        return f"{self.layers}.{layer}.{self.mlp_out}"

    def weight_name(self, layer: int) -> str:
        """Name of the edited parameter (the MLP output projection's weight)."""
        return f"{self.mlp_out_path(layer)}.weight"

    def with_overrides(self, **changes: object) -> ModelSpec:
        return replace(self, **changes)  # type: ignore[arg-type]


_LLAMA_LIKE = ModelSpec(family="llama", layers="model.layers", mlp_out="mlp.down_proj")

SPECS: dict[str, ModelSpec] = {
    "gpt2": ModelSpec(family="gpt2", layers="transformer.h", mlp_out="mlp.c_proj", conv1d=True),
    "gptj": ModelSpec(family="gptj", layers="transformer.h", mlp_out="mlp.fc_out"),
    "gpt_neox": ModelSpec(family="gpt_neox", layers="gpt_neox.layers", mlp_out="mlp.dense_4h_to_h"),
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE.with_overrides(family="mistral"),
    "qwen2": _LLAMA_LIKE.with_overrides(family="qwen2"),
    "gemma3_text": _LLAMA_LIKE.with_overrides(
        family="gemma3_text",
        mlp_post_norm="post_feedforward_layernorm",
        post_norm_offset=1.0,
    ),
}


def detect_spec(model: nn.Module, override: ModelSpec | None = None) -> ModelSpec:
    """The spec for `model`'s family, or `override` when the caller gives one."""
    if override is not None:
        return override
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in SPECS:
        known = ", ".join(sorted(SPECS))
        raise UnsupportedModelError(
            f"no ModelSpec for model_type={model_type!r}; known families: {known}. "
            "Pass a ModelSpec to edit this model.",
            field="model",
        )
    return SPECS[model_type]


def get_module(model: nn.Module, path: str) -> nn.Module:
    try:
        return model.get_submodule(path)
    except AttributeError as exc:
        raise UnsupportedModelError(f"model has no module {path!r}", field="model") from exc


def num_layers(model: nn.Module, spec: ModelSpec) -> int:
    return len(get_module(model, spec.layers))  # type: ignore[arg-type]


def edited_weight(model: nn.Module, spec: ModelSpec, layer: int) -> torch.nn.Parameter:
    return get_module(model, spec.mlp_out_path(layer)).weight  # type: ignore[return-value]
