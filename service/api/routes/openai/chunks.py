"""How each route says a stream, as the chunks it sends: at a choice's start, per piece of
text (with the logprobs of its tokens), at a choice's end, and the usage."""

from __future__ import annotations

import time

from pydantic import BaseModel
from transformers import PreTrainedTokenizerBase

from ....engine.generation import GenerationOutput, GenerationRequest, TokenLogprob
from ...openai_schemas import (
    ChatChunkChoice,
    ChatCompletionChunk,
    CompletionChoice,
    CompletionIn,
    CompletionLogprobs,
    CompletionOut,
    Usage,
)
from .common import Prompt, fingerprint, finish_reason
from .logprobs import add_completion_logprobs, chat_logprobs


class Chunks:
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

    def choice_fingerprint(self, index: int) -> str:
        version = self.requests[index].version
        return fingerprint(self.version if version is None else version)

    def start(self, index: int) -> BaseModel | None:
        return None

    def piece(self, index: int, text: str, entries: list[TokenLogprob]) -> BaseModel:
        raise NotImplementedError

    def end(self, index: int, output: GenerationOutput, entries: list[TokenLogprob]) -> BaseModel:
        raise NotImplementedError

    def usage(self, usage: Usage) -> BaseModel:
        raise NotImplementedError


class CompletionChunks(Chunks):
    def __init__(
        self,
        ident: str,
        model: str,
        tok: PreTrainedTokenizerBase,
        requests: list[GenerationRequest],
        owners: list[Prompt],
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
            self.offsets[index] = add_completion_logprobs(
                logprobs, self.tok, scored, self.offsets[index]
            )
        choice = CompletionChoice(index=index, text=text, logprobs=logprobs, finish_reason=finish)
        return CompletionOut(
            id=self.ident,
            created=self.created,
            model=self.model,
            system_fingerprint=self.choice_fingerprint(index),
            choices=[choice],
        )

    def start(self, index: int) -> BaseModel | None:
        if not self.echo[index]:
            return None
        return CompletionOut(
            id=self.ident,
            created=self.created,
            model=self.model,
            system_fingerprint=self.choice_fingerprint(index),
            choices=[CompletionChoice(index=index, text=self.echo[index])],
        )

    def piece(self, index: int, text: str, entries: list[TokenLogprob]) -> BaseModel:
        return self._chunk(index, text, entries, None)

    def end(self, index: int, output: GenerationOutput, entries: list[TokenLogprob]) -> BaseModel:
        return self._chunk(index, "", entries, finish_reason(output))

    def usage(self, usage: Usage) -> BaseModel:
        return CompletionOut(
            id=self.ident,
            created=self.created,
            model=self.model,
            system_fingerprint=fingerprint(self.version),
            choices=[],
            usage=usage,
        )


class ChatChunks(Chunks):
    def _chunk(
        self,
        index: int,
        delta: dict[str, str],
        entries: list[TokenLogprob] | None,
        finish: str | None,
    ) -> ChatCompletionChunk:
        asked = self.requests[index].logprobs is not None
        logprobs = chat_logprobs(self.tok, entries) if asked and entries is not None else None
        choice = ChatChunkChoice(index=index, delta=delta, logprobs=logprobs, finish_reason=finish)
        return ChatCompletionChunk(
            id=self.ident,
            created=self.created,
            model=self.model,
            system_fingerprint=self.choice_fingerprint(index),
            choices=[choice],
        )

    def start(self, index: int) -> BaseModel | None:
        return self._chunk(index, {"role": "assistant", "content": ""}, None, None)

    def piece(self, index: int, text: str, entries: list[TokenLogprob]) -> BaseModel:
        return self._chunk(index, {"content": text}, entries, None)

    def end(self, index: int, output: GenerationOutput, entries: list[TokenLogprob]) -> BaseModel:
        return self._chunk(index, {}, entries, finish_reason(output))

    def usage(self, usage: Usage) -> BaseModel:
        return ChatCompletionChunk(
            id=self.ident,
            created=self.created,
            model=self.model,
            system_fingerprint=fingerprint(self.version),
            choices=[],
            usage=usage,
        )
