"""Forward-pass instrumentation: read module inputs, stop early, freeze lower layers."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn


class _StopForward(Exception):
    """Raised by a hook to end a forward pass once the needed activations are read."""


@contextmanager
def record_inputs(model: nn.Module, paths: list[str]) -> Iterator[dict[str, torch.Tensor]]:
    """Record the first positional input of each module in `paths` during the next forward."""
    seen: dict[str, torch.Tensor] = {}
    handles = []
    for path in paths:
        module = model.get_submodule(path)

        def hook(_m: nn.Module, args: tuple[Any, ...], path: str = path) -> None:
            seen[path] = args[0].detach()

        handles.append(module.register_forward_pre_hook(hook))
    try:
        yield seen
    finally:
        for handle in handles:
            handle.remove()


def forward_until(model: nn.Module, stop_after: str, **inputs: Any) -> None:
    """Run `model(**inputs)` but stop right after module `stop_after` has run."""

    def stop(*_: Any) -> None:
        raise _StopForward

    handle = model.get_submodule(stop_after).register_forward_hook(stop)
    try:
        model(**inputs)
    except _StopForward:
        pass
    finally:
        handle.remove()


def hidden_of(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


def _like(output: Any, hidden: torch.Tensor) -> Any:
    return (hidden, *output[1:]) if isinstance(output, tuple) else hidden


@contextmanager
def frozen_below(
    layers: nn.ModuleList, top: int, make_output: Callable[[], torch.Tensor], example: Any
) -> Iterator[None]:
    """Replace blocks 0..top by stubs; block `top` returns `make_output()`.

    The blocks at and below `top` do not depend on a vector optimised at `top`'s output,
    so their activations are computed once and not on every optimisation step. `example`
    is one real output of a block, giving the stubs its structure (tensor or tuple).
    """
    own = [layers[i].__dict__.get("forward") for i in range(top + 1)]

    def passthrough(*args: Any, **kwargs: Any) -> Any:
        hidden = args[0] if args else kwargs["hidden_states"]
        return _like(example, hidden)

    def replaced(*_args: Any, **_kwargs: Any) -> Any:
        return _like(example, make_output())

    for i in range(top):
        layers[i].forward = passthrough
    layers[top].forward = replaced
    try:
        yield
    finally:
        for i, forward in enumerate(own):
            if forward is None:
                del layers[i].forward
            else:
                layers[i].forward = forward
