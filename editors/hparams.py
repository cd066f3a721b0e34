"""Hyperparameters shared by the locate-then-edit methods, and override handling."""

from __future__ import annotations

import dataclasses
import json
from typing import Any, TypeVar

from .core.values import ValueOptions
from .errors import InvalidValueError, LayerOutOfRangeError, UnknownHyperparameterError

H = TypeVar("H")


@dataclasses.dataclass(frozen=True)
class LocateEditHyperParams:
    """Fields every locate-then-edit method has (value optimisation and context prefixes)."""

    prefixes: int = 5  # sampled context prefixes, besides the bare prompt
    prefix_length: int = 10
    steps: int = 25
    lr: float = 0.5
    kl_factor: float = 0.0625
    weight_decay: float = 0.5
    clamp_norm_factor: float = 0.75  # |delta| <= factor * |residual at the subject|
    stop_nll: float = 0.05
    seed: int = 0

    def __post_init__(self) -> None:
        positive = ("steps", "lr", "prefix_length", "clamp_norm_factor", "stop_nll")
        for name in positive:
            if getattr(self, name) <= 0:
                raise InvalidValueError(f"{name} must be positive", field=name)
        for name in ("prefixes", "kl_factor", "weight_decay"):
            if getattr(self, name) < 0:
                raise InvalidValueError(f"{name} must not be negative", field=name)

    @property
    def value_options(self) -> ValueOptions:
        return ValueOptions(
            steps=self.steps,
            lr=self.lr,
            kl_factor=self.kl_factor,
            weight_decay=self.weight_decay,
            clamp_norm_factor=self.clamp_norm_factor,
            stop_nll=self.stop_nll,
        )


# The most one edit may ask for of what costs time or memory: past these an edit could hold
# the model (and the job queue behind it) for as long as it liked.
UPPER_BOUNDS: dict[str, int] = {
    "steps": 1000,
    "prefixes": 50,
    "prefix_length": 64,
    "iterations": 20,
    "span": 16,
    "layers": 16,  # how many layers a list may name
}


def with_overrides(base: H, overrides: dict[str, Any] | None) -> H:
    """`base` with `overrides` applied. Unknown names are refused with
    UnknownHyperparameterError; wrongly typed values and values past `UPPER_BOUNDS` with
    InvalidValueError."""
    if not overrides:
        return base
    fields = {f.name: f for f in dataclasses.fields(base)}  # type: ignore[arg-type]
    unknown = sorted(set(overrides) - set(fields))
    if unknown:
        raise UnknownHyperparameterError(
            f"unknown hyperparameter(s) {unknown}; known: {sorted(fields)}", field=unknown[0]
        )
    coerced = {
        name: _coerce(name, str(fields[name].type), value) for name, value in overrides.items()
    }
    for name, value in coerced.items():
        bound = UPPER_BOUNDS.get(name)
        size = len(value) if isinstance(value, tuple) else value
        if bound is not None and isinstance(size, int) and size > bound:
            what = "entries" if isinstance(value, tuple) else ""
            raise InvalidValueError(
                f"{name} is limited to {bound}{' ' + what if what else ''}", field=name
            )
    return dataclasses.replace(base, **coerced)  # type: ignore[type-var]


def _coerce(name: str, declared: str, value: Any) -> Any:
    """Check `value` against the field's declared type (annotations are strings here)."""
    if value is None and declared.endswith("| None"):
        return None
    if declared.startswith("tuple"):
        if not isinstance(value, list | tuple) or not all(
            isinstance(v, int) and not isinstance(v, bool) for v in value
        ):
            raise InvalidValueError(f"{name} must be a list of integers", field=name)
        return tuple(value)
    if declared.startswith("bool"):
        if not isinstance(value, bool):
            raise InvalidValueError(f"{name} must be true or false", field=name)
        return value
    if declared.startswith("int"):
        if not isinstance(value, int) or isinstance(value, bool):
            raise InvalidValueError(f"{name} must be an integer", field=name)
        return value
    if declared.startswith("float"):
        if not isinstance(value, int | float) or isinstance(value, bool):
            raise InvalidValueError(f"{name} must be a number", field=name)
        return float(value)
    if declared.startswith("str") and not isinstance(value, str):
        raise InvalidValueError(f"{name} must be a string", field=name)
    return value


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """`name=value` strings (command lines) to overrides; values are JSON, else strings."""
    out: dict[str, Any] = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            raise InvalidValueError(f"expected name=value, got {pair!r}", field=pair)
        try:
            out[name] = json.loads(value)
        except json.JSONDecodeError:
            out[name] = value
    return out


def layer_at(fraction: float, n_layers: int) -> int:
    return min(n_layers - 1, max(0, round(fraction * n_layers)))


def check_layers(layers: list[int], n_layers: int, field: str = "layers") -> None:
    """Every index names a layer of the model; `field` is the hyperparameter that gave them."""
    for layer in layers:
        if not 0 <= layer < n_layers:
            raise LayerOutOfRangeError(
                f"layer {layer} is outside the model's 0..{n_layers - 1}", field=field
            )


@dataclasses.dataclass(frozen=True)
class TargetSource:
    """Which weights a spread method seeks its targets on: the current ones; with `rewind`
    those before the edit history (NSE's weights rewinding); with `edited_context` as well,
    only the subject's state from those and every other token's from the current ones."""

    rewind: bool = False
    edited_context: bool = False


@dataclasses.dataclass(frozen=True)
class SpreadHyperParams(LocateEditHyperParams):
    """Methods that spread an edit over several layers (MEMIT, AlphaEdit, NSE)."""

    layers: tuple[int, ...] | None = None  # None: `span` layers ending at the default depth
    last_layer_fraction: float = 0.23
    span: int = 5
    mom2_update_weight: float = 1000.0  # lam in lam C: how strongly C protects other keys
    # layer sweeps: each later one carries the requests whose top output is still more than
    # `tolerance` of their starting distance from the target (see core/spread.py)
    iterations: int = 1
    tolerance: float = 0.1
    # 0: off; else no layer is asked for more than this many times its even share of the
    # sweep's starting distance to z, so one layer's overshoot cannot grow the next's task
    layer_share_cap: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.layer_share_cap < 0:
            raise InvalidValueError("layer_share_cap must not be negative", field="layer_share_cap")
        if self.iterations < 1:
            raise InvalidValueError("iterations must be at least 1", field="iterations")
        if not 0 <= self.tolerance < 1:
            raise InvalidValueError("tolerance must lie in [0, 1)", field="tolerance")
        if self.mom2_update_weight < 0:
            raise InvalidValueError(
                "mom2_update_weight must not be negative", field="mom2_update_weight"
            )
        if self.layers is not None and (
            not self.layers or list(self.layers) != sorted(set(self.layers))
        ):
            raise InvalidValueError("layers must be distinct and ascending", field="layers")

    @property
    def target_source(self) -> TargetSource:
        return TargetSource()

    def edited_layers(self, n_layers: int) -> list[int]:
        return self.resolved_layers(n_layers)

    def resolved_layers(self, n_layers: int) -> list[int]:
        if self.layers is not None:
            layers = list(self.layers)
        else:
            last = layer_at(self.last_layer_fraction, n_layers)
            layers = list(range(max(0, last - self.span + 1), last + 1))
        check_layers(layers, n_layers)
        return layers


@dataclasses.dataclass(frozen=True)
class SequentialHyperParams(SpreadHyperParams):
    """Spread methods that protect the keys of earlier edits (AlphaEdit, NSE)."""

    # w in (... + w K_p K_p^T + ...): how much one earlier edit's key counts against a new
    # key in the update's system; 1 is the papers' choice, larger keeps old edits firmer
    history_weight: float = 1.0
    # optimise the targets on the weights before the history (NSE's weights rewinding)
    rewind: bool = False
    # with rewind: only the subject's state is taken on the rewound weights (the anchor
    # each target starts from); the target is sought with the other tokens as the edited
    # weights give them, the context the edit will be read in
    edited_context: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.history_weight < 0:
            raise InvalidValueError("history_weight must not be negative", field="history_weight")
        if self.edited_context and not self.rewind:
            raise InvalidValueError("edited_context needs rewind", field="edited_context")

    @property
    def target_source(self) -> TargetSource:
        return TargetSource(self.rewind, self.edited_context)
