"""/v1/chat/completions: chat, as vLLM serves it; the messages go through the chat
template."""

from __future__ import annotations

import uuid

from fastapi import APIRouter, Response
from fastapi.responses import StreamingResponse

from ....engine.generation import GenerationOutput
from ...deps import EngineDep, StateDep
from ...openai_schemas import ChatChoice, ChatCompletionIn, ChatCompletionOut, ChatMessageOut
from .answer import answer
from .chunks import ChatChunks
from .common import GENERATE, bad_request, finish_reason, served
from .logprobs import chat_logprobs
from .prompts import chat_memory, chat_prompt
from .sampling import generation_requests, max_tokens
from .stream import stream

router = APIRouter(prefix="/v1", tags=["openai"])


@router.post("/chat/completions", response_model=ChatCompletionOut, dependencies=GENERATE)
async def chat_completions(
    body: ChatCompletionIn, state: StateDep, engine: EngineDep, response: Response
) -> ChatCompletionOut | StreamingResponse:
    """Chat (vLLM's /v1/chat/completions): the messages through the chat template."""
    model = served(body.model, state)
    if body.top_logprobs is not None and not body.logprobs:
        raise bad_request("top_logprobs needs logprobs: true", "top_logprobs")
    prompt = chat_prompt(body.messages, engine, state)
    param = "max_tokens" if body.max_completion_tokens is None else "max_completion_tokens"
    requested = (
        body.max_tokens if body.max_completion_tokens is None else body.max_completion_tokens
    )
    budget = max_tokens(requested, param, [prompt], engine, state)
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    requests = generation_requests([prompt], body, budget, logprobs, None)
    query, with_context = chat_memory(body.messages)  # IKE: demonstrations go in the last turn
    for request in requests:
        request.memory_query, request.with_context = query, with_context
    if body.stream:
        chunks = ChatChunks(f"chatcmpl-{uuid.uuid4().hex}", model, engine.tok, requests)
        return await stream(state, engine, requests, chunks, [prompt], body)

    def choice(index: int, output: GenerationOutput) -> ChatChoice:
        return ChatChoice(
            index=index,
            message=ChatMessageOut(content=output.text),
            logprobs=None if logprobs is None else chat_logprobs(engine.tok, output.logprobs or []),
            finish_reason=finish_reason(output),
        )

    return await answer(
        ChatCompletionOut,
        "chatcmpl",
        model,
        [prompt],
        requests,
        choice,
        state=state,
        engine=engine,
        response=response,
    )
