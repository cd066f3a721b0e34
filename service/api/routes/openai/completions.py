"""/v1/completions: text completion, as vLLM serves it."""

from __future__ import annotations

import uuid

from fastapi import APIRouter, Response
from fastapi.responses import StreamingResponse
from transformers import PreTrainedTokenizerBase

from ....engine.generation import GenerationOutput
from ...deps import EngineDep, StateDep
from ...openai_schemas import CompletionChoice, CompletionIn, CompletionLogprobs, CompletionOut
from .answer import answer
from .chunks import CompletionChunks
from .common import GENERATE, Prompt, bad_request, finish_reason, served
from .logprobs import add_completion_logprobs
from .prompts import completion_prompts
from .sampling import generation_requests, max_tokens
from .stream import stream

router = APIRouter(prefix="/v1", tags=["openai"])


def _completion_choice(
    index: int,
    prompt: Prompt,
    output: GenerationOutput,
    body: CompletionIn,
    tok: PreTrainedTokenizerBase,
) -> CompletionChoice:
    echo = prompt.text if body.echo else ""
    logprobs = None
    if body.logprobs is not None:
        logprobs = CompletionLogprobs()
        if body.echo:
            scores = output.prompt_logprobs or [None] * len(output.prompt_ids)
            scored = list(zip(output.prompt_ids, scores, strict=True))
            add_completion_logprobs(logprobs, tok, scored, 0)
        generated = [(entry.token, entry) for entry in output.logprobs or []]
        add_completion_logprobs(logprobs, tok, generated, len(echo))
    return CompletionChoice(
        index=index,
        text=echo + output.text,
        logprobs=logprobs,
        finish_reason=finish_reason(output),
    )


@router.post("/completions", response_model=CompletionOut, dependencies=GENERATE)
async def completions(
    body: CompletionIn, state: StateDep, engine: EngineDep, response: Response
) -> CompletionOut | StreamingResponse:
    """Text completion (vLLM's /v1/completions). `echo` with `logprobs` scores the prompt
    too (its first token has none), which is how lm-evaluation-harness asks for
    log-likelihoods."""
    model = served(body.model, state)
    if body.best_of not in (None, body.n):
        raise bad_request("best_of is not supported apart from best_of = n", "best_of")
    if body.stream and body.echo and body.logprobs is not None:
        raise bad_request(
            "the prompt's logprobs are not streamed: leave out echo or stream", "echo"
        )
    prompts = completion_prompts(body, engine, state)
    budget = max_tokens(body.max_tokens, "max_tokens", prompts, engine, state)
    prompt_logprobs = body.logprobs if body.echo else None
    requests = generation_requests(prompts, body, budget, body.logprobs, prompt_logprobs)
    owners = [prompt for prompt in prompts for _ in range(body.n)]  # each choice's prompt
    if body.stream:
        chunks = CompletionChunks(
            f"cmpl-{uuid.uuid4().hex}", model, engine.tok, requests, owners, body
        )
        return await stream(state, engine, requests, chunks, prompts, body)
    return await answer(
        CompletionOut,
        "cmpl",
        model,
        prompts,
        requests,
        lambda index, output: _completion_choice(index, owners[index], output, body, engine.tok),
        state=state,
        engine=engine,
        response=response,
    )
