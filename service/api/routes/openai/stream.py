"""Streaming answers as server-sent events: the choices generating at once (`_Fanout`),
their events turned into a route's chunks (`chunks.py`), then `data: [DONE]`."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from ....engine.engine import Engine
from ....engine.generation import GenerationOutput, GenerationRequest, TokenLogprob
from ....state import ServiceState
from ...openai_schemas import ErrorInfo, ErrorOut, SamplingIn
from .chunks import Chunks
from .common import Prompt, usage

log = logging.getLogger(__name__)

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


def _sse(chunk: BaseModel | dict[str, object]) -> str:
    data = chunk.model_dump_json() if isinstance(chunk, BaseModel) else json.dumps(chunk)
    return f"data: {data}\n\n"


async def stream(
    state: ServiceState,
    engine: Engine,
    requests: list[GenerationRequest],
    chunks: Chunks,
    prompts: list[Prompt],
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

    async def sent() -> AsyncIterator[str]:
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
                yield _sse(chunks.usage(usage(prompts, done)))
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
        sent(),
        media_type="text/event-stream",
        headers={"X-Model-Version": str(chunks.version)},
    )


async def _prepend(first: _Event, events: AsyncIterator[_Event]) -> AsyncIterator[_Event]:
    yield first
    async for event in events:
        yield event
