"""/v1/generate and /v1/generate_stream: text from the edited model (TGI-style)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

from fastapi import APIRouter, Depends, Response
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from ...engine.engine import Engine
from ...engine.generation import GenerationRequest, SamplingParams
from ...state import ServiceState
from ..deps import EngineDep, StateDep, require
from ..errors import bad_input, not_found
from ..schemas import GenerateIn, GenerateOut, GenerateParameters

router = APIRouter(prefix="/v1", tags=["generate"], dependencies=[Depends(require("generate"))])

MAX_PROMPTS = 64


def _sampling(params: GenerateParameters, state: ServiceState) -> SamplingParams:
    if params.max_new_tokens > state.settings.max_new_tokens:
        raise bad_input(
            f"max_new_tokens is limited to {state.settings.max_new_tokens}",
            "parameters.max_new_tokens",
            "too_many_tokens",
        )
    sampling = params.do_sample or (params.temperature or 0) > 0
    return SamplingParams(
        max_new_tokens=params.max_new_tokens,
        temperature=(params.temperature or 1.0) if sampling else 0.0,
        top_k=params.top_k or 0,
        top_p=params.top_p or 1.0,
        seed=params.seed,
        stop=tuple(params.stop),
    )


def _prompts(body: GenerateIn, engine: Engine, state: ServiceState) -> list[str]:
    prompts = [body.inputs] if isinstance(body.inputs, str) else list(body.inputs)
    if not prompts or len(prompts) > MAX_PROMPTS:
        raise bad_input(f"give 1 to {MAX_PROMPTS} prompts", "inputs")
    for index, prompt in enumerate(prompts):
        field = "inputs" if isinstance(body.inputs, str) else f"inputs.{index}"
        if not prompt:
            raise bad_input("prompt is empty", field)
        count = len(engine.tok(prompt)["input_ids"])
        if count > state.settings.max_prompt_tokens:
            raise bad_input(
                f"prompt is {count} tokens; the limit is {state.settings.max_prompt_tokens}",
                field,
                "too_many_tokens",
            )
    return prompts


def _check_version(number: int, state: ServiceState) -> None:
    if state.ledger.version(number) is None:
        head = state.ledger.head().number
        raise not_found(f"version {number} does not exist (the head is {head})", "version")


@router.post("/generate", response_model=GenerateOut | list[GenerateOut])
async def generate(
    body: GenerateIn, state: StateDep, engine: EngineDep, response: Response
) -> GenerateOut | list[GenerateOut]:
    """One prompt gives one result; a list gives a list. Concurrent calls share batches."""
    params = _sampling(body.parameters, state)
    prompts = _prompts(body, engine, state)
    if body.version is not None and body.version != engine.version:
        await run_in_threadpool(_check_version, body.version, state)
        requests = [GenerationRequest(p, params) for p in prompts]
        outputs = await engine.generate_at(body.version, requests)
    else:
        outputs = await asyncio.gather(
            *(engine.generate(GenerationRequest(p, params)) for p in prompts)
        )
    results = [
        GenerateOut(
            generated_text=o.text,
            finish_reason=o.finish_reason,
            generated_tokens=o.tokens,
            prompt_tokens=o.prompt_tokens,
            model_version=o.version,
        )
        for o in outputs
    ]
    state.metrics.generated_tokens.inc(sum(o.tokens for o in outputs))
    response.headers["X-Model-Version"] = str(results[0].model_version)
    return results[0] if isinstance(body.inputs, str) else results


@router.post("/generate_stream", response_class=StreamingResponse)
async def generate_stream(
    body: GenerateIn, state: StateDep, engine: EngineDep
) -> StreamingResponse:
    """Server-sent events, one per piece of text, then one with the whole text."""
    if not isinstance(body.inputs, str):
        raise bad_input("streaming takes one prompt", "inputs")
    if body.version is not None and body.version != engine.version:
        raise bad_input("streaming answers from the served version only", "version")
    params = _sampling(body.parameters, state)
    (prompt,) = _prompts(body, engine, state)
    loop = asyncio.get_running_loop()
    pieces: asyncio.Queue[str] = asyncio.Queue()

    def on_text(text: str) -> None:
        loop.call_soon_threadsafe(pieces.put_nowait, text)

    request = GenerationRequest(prompt, params, on_text)
    task = asyncio.ensure_future(engine.generate(request))

    async def events() -> AsyncIterator[str]:
        try:
            async for event in _events():
                yield event
        finally:  # the client went away (or the stream ended): stop generating for it
            request.cancelled.set()
            if not task.done():
                task.cancel()

    async def _events() -> AsyncIterator[str]:
        index = 0
        while not (task.done() and pieces.empty()):
            getter = asyncio.ensure_future(pieces.get())
            await asyncio.wait({getter, task}, return_when=asyncio.FIRST_COMPLETED)
            if not getter.done():
                getter.cancel()
                continue
            text = getter.result()
            index += 1
            token = {"token": {"id": index, "text": text}, "generated_text": None}
            yield f"data: {json.dumps(token)}\n\n"
        output = task.result()
        state.metrics.generated_tokens.inc(output.tokens)
        final = {
            "token": None,
            "generated_text": output.text,
            "details": {
                "finish_reason": output.finish_reason,
                "generated_tokens": output.tokens,
                "model_version": output.version,
            },
        }
        yield f"data: {json.dumps(final)}\n\n"

    return StreamingResponse(
        events(), media_type="text/event-stream", headers={"X-Model-Version": str(engine.version)}
    )
