"""A whole answer, for a call that does not stream: every choice generated from one model
version, counted, and enveloped in the route's response shape."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable
from typing import TypeVar

from fastapi import Response
from pydantic import BaseModel

from ....engine.engine import Engine
from ....engine.generation import GenerationOutput, GenerationRequest
from ....state import ServiceState
from ...openai_schemas import ChatCompletionOut, CompletionOut
from .common import Prompt, fingerprint, usage

VERSION_TRIES = 3  # runs of a call whose choices straddled a swap, before answering anyway

Out = TypeVar("Out", CompletionOut, ChatCompletionOut)


async def _generate(engine: Engine, requests: list[GenerationRequest]) -> list[GenerationOutput]:
    """Every choice, from one model version: a swap between the admissions of two choices
    (possible when the batch is full) has the call run again."""
    for _ in range(VERSION_TRIES):
        outputs = await asyncio.gather(*(engine.generate(r) for r in requests))
        if len({output.version for output in outputs}) == 1:
            break
    return list(outputs)


async def answer(
    shape: type[Out],
    ident_prefix: str,
    model: str,
    prompts: list[Prompt],
    requests: list[GenerationRequest],
    choice: Callable[[int, GenerationOutput], BaseModel],
    *,
    state: ServiceState,
    engine: Engine,
    response: Response,
) -> Out:
    """`shape` (a completion or a chat completion) with one choice per request, built by
    `choice(index, output)`; the answering version in `X-Model-Version` and the fingerprint,
    the generated tokens in the metrics."""
    outputs = await _generate(engine, requests)
    version = outputs[0].version
    state.metrics.generated_tokens.inc(sum(output.tokens for output in outputs))
    response.headers["X-Model-Version"] = str(version)
    return shape(
        id=f"{ident_prefix}-{uuid.uuid4().hex}",
        created=int(time.time()),
        model=model,
        system_fingerprint=fingerprint(version),
        choices=[choice(index, output) for index, output in enumerate(outputs)],
        usage=usage(prompts, outputs),
    )
