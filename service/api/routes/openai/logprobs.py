"""Logprobs in OpenAI's two shapes: a completion's (parallel lists of tokens, offsets,
logprobs and top alternatives) and a chat's (one entry per token). Minus infinity is sent
as `NO_LOGPROB`, as vLLM does."""

from __future__ import annotations

from collections.abc import Sequence

from transformers import PreTrainedTokenizerBase

from ....engine.generation import TokenLogprob
from ...openai_schemas import ChatLogprobs, ChatTokenLogprob, CompletionLogprobs, TopLogprob

NO_LOGPROB = -9999.0  # what -inf is sent as


def _finite(logprob: float) -> float:
    return max(logprob, NO_LOGPROB)


def _token_text(tok: PreTrainedTokenizerBase, token: int) -> str:
    return str(tok.decode([token]))


def add_completion_logprobs(
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


def chat_logprobs(tok: PreTrainedTokenizerBase, entries: Sequence[TokenLogprob]) -> ChatLogprobs:
    content = [
        ChatTokenLogprob(
            **_top(tok, entry.token, entry.logprob).model_dump(),
            top_logprobs=[_top(tok, token, logprob) for token, logprob in entry.top],
        )
        for entry in entries
    ]
    return ChatLogprobs(content=content)
