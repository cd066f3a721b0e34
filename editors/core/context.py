"""What every locate-then-edit computation settles before it starts."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..model_spec import ModelSpec, detect_spec, num_layers
from ..prefixes import sample_prefixes
from ..stats import Statistics


@dataclass(frozen=True)
class EditContext:
    spec: ModelSpec
    layers: list[int]
    prefixes: list[str]


def edit_context(
    model: PreTrainedModel,
    tok: PreTrainedTokenizerBase,
    hparams: Any,
    stats: Statistics,
    spec: ModelSpec | None,
    prefixes: list[str] | None,
) -> EditContext:
    """Family spec, the edited layers (checked), their statistics, and the context prefixes
    (sampled from the seed unless an earlier result's are given for a replay)."""
    spec = detect_spec(model, spec)
    layers = hparams.edited_layers(num_layers(model, spec))
    stats.prepare(layers)
    if prefixes is None:
        prefixes = sample_prefixes(
            model, tok, hparams.prefixes, hparams.prefix_length, hparams.seed
        )
    return EditContext(spec, layers, prefixes)
