"""/v1/methods: every editing method with its hyperparameters, so clients (and the console)
build their forms from the server instead of hard-coding them."""

from __future__ import annotations

import dataclasses
import typing
from typing import Any

from fastapi import APIRouter, Depends

from editors.hparams import UPPER_BOUNDS
from editors.methods import METHODS, Method
from editors.model_spec import num_layers

from ..deps import EngineDep, authenticated
from ..schemas import HyperparameterOut, MethodOut

router = APIRouter(prefix="/v1", tags=["methods"], dependencies=[Depends(authenticated)])


def _type_name(annotation: Any) -> str:
    """'int', 'float', 'bool', 'str', 'list[int]', 'int | None', ... from a field's type."""
    if isinstance(annotation, type):
        return annotation.__name__
    text = str(annotation).replace("typing.", "")
    return text.replace("NoneType", "None")


def _maximum(name: str, n_layers: int) -> int | None:
    """The largest value a field takes: a layer index, or the bound on what costs time."""
    if name in ("layer", "layers"):
        return n_layers - 1
    return UPPER_BOUNDS.get(name)


def _hyperparameters(method: Method, family: str, n_layers: int) -> list[HyperparameterOut]:
    defaults = method.hparams(family)
    hints = typing.get_type_hints(method.hparams_type)
    rows = []
    for field in dataclasses.fields(defaults):
        value = getattr(defaults, field.name)
        rows.append(
            HyperparameterOut(
                name=field.name,
                type=_type_name(hints.get(field.name, type(value))),
                default=list(value) if isinstance(value, tuple) else value,
                maximum=_maximum(field.name, n_layers),
                max_items=UPPER_BOUNDS["layers"] if field.name == "layers" else None,
            )
        )
    return rows


@router.get("/methods", response_model=list[MethodOut])
def list_methods(engine: EngineDep) -> list[MethodOut]:
    """Each method, its hyperparameters with the defaults for the served model's family and
    their bounds, and what it needs."""
    family = engine.editor.spec.family
    n_layers = num_layers(engine.model, engine.editor.spec)
    return [
        MethodOut(
            name=name,
            family=family,
            needs_statistics=method.needs_statistics,
            uses_history=method.uses_history,
            subtractable=method.subtractable,
            writes_weights=method.writes_weights,
            hyperparameters=_hyperparameters(method, family, n_layers),
        )
        for name, method in sorted(METHODS.items())
    ]
