"""OpenAI-compatible routes, in the shapes vLLM serves: /v1/models, /v1/completions and
/v1/chat/completions. Translation only: every choice is one `GenerationRequest` on the
serving loop, as /v1/generate's prompts are; nothing here touches the model.

- Errors on these paths come in OpenAI's shape, `{"error": {"message", "type", "param",
  "code"}}` (`openai_errors.py`): 400 for bad parameters (validation errors too, which the
  rest of the API answers 422), 401 without a valid key, 404 for a model not served.
- Chat prompts go through the tokenizer's chat template. A tokenizer without one gets a
  plain layout: one "role: content" line per message, then "assistant:" to answer after.
- Logprobs are the raw model's (log-softmax of its logits, before temperature, top-k or
  top-p), as vLLM reports by default; minus infinity is sent as -9999.0, as vLLM does.
- `system_fingerprint` is `editserve-v<version>`, the model version that answered, which
  the `X-Model-Version` header also carries.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field

from fastapi import APIRouter, Depends, Response
from fastapi.responses import StreamingResponse
from pydantic import BaseModel
from transformers import PreTrainedTokenizerBase

from ...engine.engine import Engine
from ...engine.generation import GenerationOutput, GenerationRequest, SamplingParams, TokenLogprob
from ...state import ServiceState
from ..deps import EngineDep, StateDep, authenticated, require
from ..errors import ApiError
from ..openai_schemas import (
    MAX_PROMPTS,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionIn,
    ChatCompletionOut,
    ChatLogprobs,
    ChatMessageIn,
    ChatMessageOut,
    ChatTokenLogprob,
    CompletionChoice,
    CompletionIn,
    CompletionLogprobs,
    CompletionOut,
    ErrorInfo,
    ErrorOut,
    ModelCard,
    ModelList,
    SamplingIn,
    TopLogprob,
    Usage,
)

log = logging.getLogger(__name__)

router = APIRouter(prefix="/v1", tags=["openai"])
MODELS = [Depends(authenticated)]
GENERATE = [Depends(require("generate"))]

NO_LOGPROB = -9999.0  # what -inf is sent as
GREEDY_BELOW = 1e-5  # temperature
VERSION_TRIES = 3  # runs of a call whose choices straddled a swap, before answering anyway


@dataclass
class _Prompt:
    ids: list[int]
    text: str  # what `echo` sends back


def _bad(message: str, param: str | None, code: str = "invalid_request") -> ApiError:
    return ApiError(400, message, code, param)


def _fingerprint(version: int) -> str:
    return f"editserve-v{version}"


def _finish_reason(output: GenerationOutput) -> str:
    return "length" if output.finish_reason == "length" else "stop"  # eos or a stop string


def _finite(logprob: float) -> float:
    return max(logprob, NO_LOGPROB)


def _token_text(tok: PreTrainedTokenizerBase, token: int) -> str:
    return str(tok.decode([token]))


def _context_length(engine: Engine) -> int | None:
    length = getattr(engine.model.config, "max_position_embeddings", None)
    return length if isinstance(length, int) and length > 0 else None


# -- models -------------------------------------------------------------------------------


def _served(name: str | None, state: ServiceState) -> str:
    """The served model's id; 404 for any other name, as vLLM answers."""
    served = state.settings.model
    if name is not None and name != served:
        raise ApiError(404, f"The model `{name}` does not exist.", "model_not_found", "model")
    return served


def _card(state: ServiceState, engine: Engine) -> ModelCard:
    name = state.settings.model
    return ModelCard(
        id=name, created=int(time.time()), root=name, max_model_len=_context_length(engine)
    )


@router.get("/models", response_model=ModelList, dependencies=MODELS)
async def list_models(state: StateDep, engine: EngineDep, response: Response) -> ModelList:
    response.headers["X-Model-Version"] = str(engine.version)
    return ModelList(data=[_card(state, engine)])


@router.get("/models/{model_id:path}", response_model=ModelCard, dependencies=MODELS)
async def get_model(
    model_id: str, state: StateDep, engine: EngineDep, response: Response
) -> ModelCard:
    _served(model_id, state)
    response.headers["X-Model-Version"] = str(engine.version)
    return _card(state, engine)


# -- prompts and parameters ---------------------------------------------------------------


def _prompt_items(raw: str | list[str] | list[int] | list[list[int]]) -> list[str | list[int]]:
    if isinstance(raw, str):
        return [raw]
    if raw and isinstance(raw[0], int):  # one prompt, as token ids
        return [[int(token) for token in raw]]  # type: ignore[arg-type]
    return list(raw)  # type: ignore[arg-type]


def _completion_prompts(body: CompletionIn, engine: Engine, state: ServiceState) -> list[_Prompt]:
    items = _prompt_items(body.prompt)
    if not items or len(items) > MAX_PROMPTS:
        raise _bad(f"give 1 to {MAX_PROMPTS} prompts", "prompt")
    tok = engine.tok
    vocabulary = min(len(tok), engine.model.get_input_embeddings().weight.shape[0])
    prompts = []
    for item in items:
        if not item:
            raise _bad("a prompt is empty", "prompt")
        if isinstance(item, str):
            prompts.append(_Prompt(list(tok(item, add_special_tokens=True)["input_ids"]), item))
            continue
        if max(item) >= vocabulary:
            raise _bad(f"token id {max(item)} is not below the vocabulary's {vocabulary}", "prompt")
        prompts.append(_Prompt(list(item), str(tok.decode(item))))
    _check_prompt_lengths(prompts, state, "prompt")
    return prompts


def _plain_chat(conversation: list[dict[str, str]]) -> str:
    """The layout for a tokenizer without a chat template: "role: content" lines, then the
    assistant's turn to speak."""
    return "".join(f"{m['role']}: {m['content']}\n" for m in conversation) + "assistant:"


def _chat_prompt(messages: list[ChatMessageIn], engine: Engine, state: ServiceState) -> _Prompt:
    conversation = []
    for index, message in enumerate(messages):
        if message.text is None:
            raise _bad(f"message {index} has no content", "messages")
        conversation.append({"role": message.role, "content": message.text})
    tok = engine.tok
    if getattr(tok, "chat_template", None):
        try:
            text = tok.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
        except Exception as exc:  # the template's own checks (roles must alternate, ...)
            raise _bad(f"the chat template refused the messages: {exc}", "messages") from exc
        ids = tok(str(text), add_special_tokens=False)["input_ids"]  # the template has them
    else:
        text = _plain_chat(conversation)
        ids = tok(text, add_special_tokens=True)["input_ids"]
    prompt = _Prompt(list(ids), str(text))
    _check_prompt_lengths([prompt], state, "messages")
    return prompt


def _check_prompt_lengths(prompts: list[_Prompt], state: ServiceState, param: str) -> None:
    limit = state.settings.max_prompt_tokens
    for prompt in prompts:
        if not prompt.ids:
            raise _bad("a prompt encodes to no tokens", param)
        if len(prompt.ids) > limit:
            raise _bad(
                f"a prompt is {len(prompt.ids)} tokens; the limit is {limit}",
                param,
                "too_many_tokens",
            )


def _max_tokens(
    requested: int | None, param: str, prompts: list[_Prompt], engine: Engine, state: ServiceState
) -> int:
    """The token budget: as asked, within the service's limit and the model's context;
    unset, whatever both leave."""
    limit, context = state.settings.max_new_tokens, _context_length(engine)
    if requested is not None and requested > limit:
        raise _bad(f"{param} is limited to {limit}", param, "too_many_tokens")
    longest = max(len(prompt.ids) for prompt in prompts)
    budget = requested
    if budget is None:
        budget = limit if context is None else max(0, min(limit, context - longest))
    if context is not None and longest + budget > context:
        raise _bad(
            f"the model's context is {context} tokens: {longest} in the prompt and "
            f"{budget} to generate do not fit",
            param,
            "too_many_tokens",
        )
    return budget


def _sampling(body: SamplingIn, max_tokens: int, choice: int) -> SamplingParams:
    """OpenAI's defaults (temperature 1); choice i of `n` samples with seed + i. A
    temperature below `GREEDY_BELOW` is greedy, as in vLLM (dividing by it overflows)."""
    temperature = 1.0 if body.temperature is None else body.temperature
    return SamplingParams(
        max_new_tokens=max_tokens,
        temperature=0.0 if temperature < GREEDY_BELOW else temperature,
        top_k=max(body.top_k or 0, 0),
        top_p=1.0 if body.top_p is None else body.top_p,
        seed=None if body.seed is None else (body.seed + choice) % 2**64,
        stop=body.stops,
    )


def _requests(
    prompts: list[_Prompt],
    body: SamplingIn,
    max_tokens: int,
    logprobs: int | None,
    prompt_logprobs: int | None,
) -> list[GenerationRequest]:
    """`n` choices per prompt, choice index = prompt index * n + i (as OpenAI orders them)."""
    return [
        GenerationRequest(
            prompt.text,
            _sampling(body, max_tokens, choice),
            prompt_ids=prompt.ids,
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
        )
        for prompt in prompts
        for choice in range(body.n)
    ]


def _usage(prompts: list[_Prompt], outputs: Sequence[GenerationOutput]) -> Usage:
    prompt_tokens = sum(len(prompt.ids) for prompt in prompts)
    completion_tokens = sum(len(output.token_ids) for output in outputs)
    return Usage(
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        total_tokens=prompt_tokens + completion_tokens,
    )


async def _generate(engine: Engine, requests: list[GenerationRequest]) -> list[GenerationOutput]:
    """Every choice, from one model version: a swap between the admissions of two choices
    (possible when the batch is full) has the call run again."""
    for _ in range(VERSION_TRIES):
        outputs = await asyncio.gather(*(engine.generate(r) for r in requests))
        if len({output.version for output in outputs}) == 1:
            break
    return list(outputs)


# -- logprobs in the two shapes -----------------------------------------------------------


def _add_completion_logprobs(
    out: CompletionLogprobs,
    tok: PreTrainedTokenizerBase,
    scored: Sequence[tuple[int, TokenLogprob | None]],
    offset: int,
) -> int:
    """Append `scored` (token, its logprob or None) to `out`, the first at character
    `offset` of the text; the offset after them."""
    for token, entry in scored:
        text = _token_text(tok, token)
        out.tokens.append(text)
        out.text_offset.append(offset)
        offset += len(text)
        if entry is None:
            out.token_logprobs.append(None)
            out.top_logprobs.append(None)
            continue
        top = {_token_text(tok, t): _finite(lp) for t, lp in entry.top}
        top.setdefault(text, _finite(entry.logprob))  # the chosen token is always there
        out.token_logprobs.append(_finite(entry.logprob))
        out.top_logprobs.append(top)
    return offset


def _top(tok: PreTrainedTokenizerBase, token: int, logprob: float) -> TopLogprob:
    text = _token_text(tok, token)
    return TopLogprob(token=text, logprob=_finite(logprob), bytes=list(text.encode()))


def _chat_logprobs(tok: PreTrainedTokenizerBase, entries: Sequence[TokenLogprob]) -> ChatLogprobs:
    content = [
        ChatTokenLogprob(
            **_top(tok, entry.token, entry.logprob).model_dump(),
            top_logprobs=[_top(tok, token, logprob) for token, logprob in entry.top],
        )
        for entry in entries
    ]
    return ChatLogprobs(content=content)


# -- completions --------------------------------------------------------------------------


def _completion_choice(
    index: int,
    prompt: _Prompt,
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
            _add_completion_logprobs(logprobs, tok, scored, 0)
        generated = [(entry.token, entry) for entry in output.logprobs or []]
        _add_completion_logprobs(logprobs, tok, generated, len(echo))
    return CompletionChoice(
        index=index,
        text=echo + output.text,
        logprobs=logprobs,
        finish_reason=_finish_reason(output),
    )


@router.post("/completions", response_model=CompletionOut, dependencies=GENERATE)
async def completions(
    body: CompletionIn, state: StateDep, engine: EngineDep, response: Response
) -> CompletionOut | StreamingResponse:
    """Text completion (vLLM's /v1/completions). `echo` with `logprobs` scores the prompt
    too (its first token has none), which is how lm-evaluation-harness asks for
    log-likelihoods."""
    model = _served(body.model, state)
    if body.best_of not in (None, body.n):
        raise _bad("best_of is not supported apart from best_of = n", "best_of")
    if body.stream and body.echo and body.logprobs is not None:
        raise _bad("the prompt's logprobs are not streamed: leave out echo or stream", "echo")
    prompts = _completion_prompts(body, engine, state)
    max_tokens = _max_tokens(body.max_tokens, "max_tokens", prompts, engine, state)
    prompt_logprobs = body.logprobs if body.echo else None
    requests = _requests(prompts, body, max_tokens, body.logprobs, prompt_logprobs)
    owners = [prompt for prompt in prompts for _ in range(body.n)]  # each choice's prompt
    if body.stream:
        chunks = _CompletionChunks(
            f"cmpl-{uuid.uuid4().hex}", model, engine.tok, requests, owners, body
        )
        return await _stream(state, engine, requests, chunks, prompts, body)
    outputs = await _generate(engine, requests)
    version = outputs[0].version
    state.metrics.generated_tokens.inc(sum(output.tokens for output in outputs))
    response.headers["X-Model-Version"] = str(version)
    return CompletionOut(
        id=f"cmpl-{uuid.uuid4().hex}",
        created=int(time.time()),
        model=model,
        system_fingerprint=_fingerprint(version),
        choices=[
            _completion_choice(index, owners[index], output, body, engine.tok)
            for index, output in enumerate(outputs)
        ],
        usage=_usage(prompts, outputs),
    )


# -- chat completions ---------------------------------------------------------------------


@router.post("/chat/completions", response_model=ChatCompletionOut, dependencies=GENERATE)
async def chat_completions(
    body: ChatCompletionIn, state: StateDep, engine: EngineDep, response: Response
) -> ChatCompletionOut | StreamingResponse:
    """Chat (vLLM's /v1/chat/completions): the messages through the chat template."""
    model = _served(body.model, state)
    if body.top_logprobs is not None and not body.logprobs:
        raise _bad("top_logprobs needs logprobs: true", "top_logprobs")
    prompt = _chat_prompt(body.messages, engine, state)
    param = "max_tokens" if body.max_completion_tokens is None else "max_completion_tokens"
    requested = (
        body.max_tokens if body.max_completion_tokens is None else body.max_completion_tokens
    )
    max_tokens = _max_tokens(requested, param, [prompt], engine, state)
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    requests = _requests([prompt], body, max_tokens, logprobs, None)
    if body.stream:
        chunks = _ChatChunks(f"chatcmpl-{uuid.uuid4().hex}", model, engine.tok, requests)
        return await _stream(state, engine, requests, chunks, [prompt], body)
    outputs = await _generate(engine, requests)
    version = outputs[0].version
    state.metrics.generated_tokens.inc(sum(output.tokens for output in outputs))
    response.headers["X-Model-Version"] = str(version)
    return ChatCompletionOut(
        id=f"chatcmpl-{uuid.uuid4().hex}",
        created=int(time.time()),
        model=model,
        system_fingerprint=_fingerprint(version),
        choices=[
            ChatChoice(
                index=index,
                message=ChatMessageOut(content=output.text),
                logprobs=None
                if logprobs is None
                else _chat_logprobs(engine.tok, output.logprobs or []),
                finish_reason=_finish_reason(output),
            )
            for index, output in enumerate(outputs)
        ],
        usage=_usage([prompt], outputs),
    )


# -- streaming ----------------------------------------------------------------------------

_Event = tuple[int, str | TokenLogprob | GenerationOutput]


@dataclass
class _Fanout:
    """Several requests generating at once, and their events (text pieces, token logprobs,
    then the output) in the order they happened, tagged with the request's index."""

    requests: list[GenerationRequest]
    tasks: list[asyncio.Future[GenerationOutput]] = field(default_factory=list)
    queue: asyncio.Queue[_Event] = field(default_factory=asyncio.Queue)

    def start(self, engine: Engine) -> None:
        loop = asyncio.get_running_loop()
        for index, request in enumerate(self.requests):
            request.on_text = self._poster(loop, index)
            request.on_logprob = self._poster(loop, index)
        self.tasks = [asyncio.ensure_future(engine.generate(r)) for r in self.requests]

    def _poster(self, loop: asyncio.AbstractEventLoop, index: int) -> Callable[[object], None]:
        def post(event: object) -> None:  # on the serving loop's thread
            loop.call_soon_threadsafe(self.queue.put_nowait, (index, event))

        return post

    async def events(self) -> AsyncIterator[_Event]:
        """Until every request has ended. A request's events are queued before its task
        is done (both go through the event loop in order), so its output comes last."""
        pending = dict(enumerate(self.tasks))
        while pending:
            if not self.queue.empty():
                yield self.queue.get_nowait()
                continue
            finished = [index for index, task in pending.items() if task.done()]
            for index in finished:
                yield index, pending.pop(index).result()
            if finished:
                continue
            getter = asyncio.ensure_future(self.queue.get())
            try:
                await asyncio.wait({getter, *pending.values()}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                if not getter.done():
                    getter.cancel()
            if getter.done() and not getter.cancelled():
                yield getter.result()

    def stop(self) -> None:
        """The client went away (or the stream ended): stop generating for it."""
        for request in self.requests:
            request.cancelled.set()
        for task in self.tasks:
            if not task.done():
                task.cancel()


class _Chunks:
    """How one route says a stream: chunks at the start, per piece of text, at each
    choice's end, and the usage."""

    def __init__(
        self,
        ident: str,
        model: str,
        tok: PreTrainedTokenizerBase,
        requests: list[GenerationRequest],
    ) -> None:
        self.ident, self.model, self.tok, self.requests = ident, model, tok, requests
        self.created = int(time.time())
        self.version = -1  # the answer's version, for the chunks of choices not yet admitted

    def fingerprint(self, index: int) -> str:
        version = self.requests[index].version
        return _fingerprint(self.version if version is None else version)

    def start(self, index: int) -> BaseModel | None:
        return None

    def piece(self, index: int, text: str, entries: list[TokenLogprob]) -> BaseModel:
        raise NotImplementedError

    def end(self, index: int, output: GenerationOutput, entries: list[TokenLogprob]) -> BaseModel:
        raise NotImplementedError

    def usage(self, usage: Usage) -> BaseModel:
        raise NotImplementedError


class _CompletionChunks(_Chunks):
    def __init__(
        self,
        ident: str,
        model: str,
        tok: PreTrainedTokenizerBase,
        requests: list[GenerationRequest],
        owners: list[_Prompt],
        body: CompletionIn,
    ) -> None:
        super().__init__(ident, model, tok, requests)
        self.echo = [prompt.text if body.echo else "" for prompt in owners]
        self.logprobs = body.logprobs is not None
        self.offsets = [len(text) for text in self.echo]

    def _chunk(
        self, index: int, text: str, entries: list[TokenLogprob], finish: str | None
    ) -> CompletionOut:
        logprobs = None
        if self.logprobs:
            logprobs = CompletionLogprobs()
            scored = [(entry.token, entry) for entry in entries]
            self.offsets[index] = _add_completion_logprobs(
                logprobs, self.tok, scored, self.offsets[index]
            )
        choice = CompletionChoice(index=index, text=text, logprobs=logprobs, finish_reason=finish)
        return CompletionOut(
            id=self.ident,
            created=self.created,
            model=self.model,
            system_fingerprint=self.fingerprint(index),
            choices=[choice],
        )

    def start(self, index: int) -> BaseModel | None:
        if not self.echo[index]:
            return None
        return CompletionOut(
            id=self.ident,
            created=self.created,
            model=self.model,
            system_fingerprint=self.fingerprint(index),
            choices=[CompletionChoice(index=index, text=self.echo[index])],
        )

    def piece(self, index: int, text: str, entries: list[TokenLogprob]) -> BaseModel:
        return self._chunk(index, text, entries, None)

    def end(self, index: int, output: GenerationOutput, entries: list[TokenLogprob]) -> BaseModel:
        return self._chunk(index, "", entries, _finish_reason(output))

    def usage(self, usage: Usage) -> BaseModel:
        return CompletionOut(
            id=self.ident,
            created=self.created,
            model=self.model,
            system_fingerprint=_fingerprint(self.version),
            choices=[],
            usage=usage,
        )


class _ChatChunks(_Chunks):
    def _chunk(
        self,
        index: int,
        delta: dict[str, str],
        entries: list[TokenLogprob] | None,
        finish: str | None,
    ) -> ChatCompletionChunk:
        asked = self.requests[index].logprobs is not None
        logprobs = _chat_logprobs(self.tok, entries) if asked and entries is not None else None
        choice = ChatChunkChoice(index=index, delta=delta, logprobs=logprobs, finish_reason=finish)
        return ChatCompletionChunk(
            id=self.ident,
            created=self.created,
            model=self.model,
            system_fingerprint=self.fingerprint(index),
            choices=[choice],
        )

    def start(self, index: int) -> BaseModel | None:
        return self._chunk(index, {"role": "assistant", "content": ""}, None, None)

    def piece(self, index: int, text: str, entries: list[TokenLogprob]) -> BaseModel:
        return self._chunk(index, {"content": text}, entries, None)

    def end(self, index: int, output: GenerationOutput, entries: list[TokenLogprob]) -> BaseModel:
        return self._chunk(index, {}, entries, _finish_reason(output))

    def usage(self, usage: Usage) -> BaseModel:
        return ChatCompletionChunk(
            id=self.ident,
            created=self.created,
            model=self.model,
            system_fingerprint=_fingerprint(self.version),
            choices=[],
            usage=usage,
        )


def _sse(chunk: BaseModel | dict[str, object]) -> str:
    data = chunk.model_dump_json() if isinstance(chunk, BaseModel) else json.dumps(chunk)
    return f"data: {data}\n\n"


async def _stream(
    state: ServiceState,
    engine: Engine,
    requests: list[GenerationRequest],
    chunks: _Chunks,
    prompts: list[_Prompt],
    body: SamplingIn,
) -> StreamingResponse:
    """Server-sent events ending with `data: [DONE]`. The answer starts once the first
    event is in, so its `X-Model-Version` names the version that answers (and an error
    before any output is an HTTP error). A client that goes away stops the generation."""
    fanout = _Fanout(requests)
    fanout.start(engine)
    events = fanout.events()
    try:
        first = await anext(events)
    except BaseException:
        fanout.stop()
        raise
    admitted = requests[first[0]].version
    chunks.version = engine.version if admitted is None else admitted
    include_usage = body.stream_options is not None and body.stream_options.include_usage

    async def stream() -> AsyncIterator[str]:
        outputs: dict[int, GenerationOutput] = {}
        held: dict[int, list[TokenLogprob]] = {}  # logprobs of tokens whose text is not out
        try:
            for index in range(len(requests)):
                if (chunk := chunks.start(index)) is not None:
                    yield _sse(chunk)
            async for index, event in _prepend(first, events):
                if isinstance(event, TokenLogprob):
                    held.setdefault(index, []).append(event)
                elif isinstance(event, str):
                    yield _sse(chunks.piece(index, event, held.pop(index, [])))
                else:
                    outputs[index] = event
                    yield _sse(chunks.end(index, event, held.pop(index, [])))
            done = [outputs[index] for index in sorted(outputs)]
            state.metrics.generated_tokens.inc(sum(output.tokens for output in done))
            if include_usage:
                yield _sse(chunks.usage(_usage(prompts, done)))
        except Exception as exc:  # after the answer began: say so in the stream
            log.exception("a stream failed")
            error = ErrorInfo(message=str(exc) or type(exc).__name__, type="server_error")
            yield _sse(ErrorOut(error=error))
        finally:
            fanout.stop()
            with contextlib.suppress(Exception):
                await events.aclose()
        yield "data: [DONE]\n\n"

    return StreamingResponse(
        stream(),
        media_type="text/event-stream",
        headers={"X-Model-Version": str(chunks.version)},
    )


async def _prepend(first: _Event, events: AsyncIterator[_Event]) -> AsyncIterator[_Event]:
    yield first
    async for event in events:
        yield event
