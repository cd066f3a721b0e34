"""Batched text generation with per-request sampling parameters.

Prompts are left-padded into one batch and decoded together with a KV cache; each row keeps
its own temperature, top-k, top-p, seed, token budget and stop strings, and may stream its
text as it grows. Rows that finish early stop emitting while the batch completes.

`generate_batch` is the static form (one batch, start to end); scheduler.py's `ServingLoop`
shares the per-row helpers here (`_Row`, `_pick`, `_advance`, `left_pad`) to let rows join
and leave a running batch; both end a row on `editors.tokens.eos_ids`.

Log-probabilities are those of the raw model distribution (log-softmax of the logits, before
temperature, top-k or top-p), as vLLM reports by default; they are computed only for rows
that ask (`logprobs`, `prompt_logprobs`), so other rows decode exactly as before.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from editors.memory import memory_of, rewrite_ids
from editors.tokens import eos_ids


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 32
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()


@dataclass(frozen=True)
class TokenLogprob:
    """A token, its log-probability given what came before, and the `k` likeliest tokens
    at its position with theirs (likeliest first; empty when no alternatives were asked)."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass
class GenerationRequest:
    prompt: str = ""
    params: SamplingParams = field(default_factory=SamplingParams)
    on_text: Callable[[str], None] | None = None  # receives each new piece of text
    # set it (e.g. the client went away) and the serving loop drops the row at its next step
    cancelled: threading.Event = field(default_factory=threading.Event)
    prompt_ids: list[int] | None = None  # the prompt as token ids: used instead of `prompt`
    logprobs: int | None = None  # each generated token's logprob, with this many alternatives
    # each prompt token's logprob given the ones before (the first has none), with this many
    # alternatives; with max_new_tokens 0 the request only scores its prompt
    prompt_logprobs: int | None = None
    on_logprob: Callable[[TokenLogprob], None] | None = None  # each generated token's, in turn
    version: int | None = field(default=None, init=False)  # set by the loop when admitted
    # IKE (editors/memory.py): the text compared with the model's memory (None: `prompt`),
    # and, for prompts built from parts (a chat), how to build them with a context before
    # the part it belongs to (None: the context goes before the whole prompt)
    memory_query: str | None = None
    with_context: Callable[[str, PreTrainedTokenizerBase], list[int]] | None = None


@dataclass
class GenerationOutput:
    text: str
    tokens: int  # generated tokens in `text` (an ending eos is not counted)
    finish_reason: str  # "length", "stop" or "eos"
    prompt_tokens: int
    version: int = -1  # the model version that produced it
    token_ids: list[int] = field(default_factory=list)  # every picked token, an ending eos too
    prompt_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None  # one per `token_ids` entry, if asked
    prompt_logprobs: list[TokenLogprob | None] | None = None  # one per prompt token, if asked


def encode(request: GenerationRequest, tok: PreTrainedTokenizerBase) -> list[int]:
    """The request's prompt tokens: its `prompt_ids`, else its `prompt` tokenized."""
    if request.prompt_ids is not None:
        return list(request.prompt_ids)
    return list(tok(request.prompt, add_special_tokens=True)["input_ids"])


def encode_with_memory(
    request: GenerationRequest, tok: PreTrainedTokenizerBase, model: torch.nn.Module
) -> tuple[list[int], list[int]]:
    """The tokens the model reads for the request's prompt, with the model's IKE memory
    applied (the demonstrations of the entries relevant to the prompt go before it,
    editors/memory.py), and the prompt's own tokens (`encode`'s), which the output reports.
    With no relevant entry (or no memory) both are `encode`'s tokens, the same list."""
    ids = encode(request, tok)
    rewritten, added = _with_memory(request, tok, model, ids)
    return (rewritten, ids) if added > 0 else (ids, ids)


def _with_memory(
    request: GenerationRequest, tok: PreTrainedTokenizerBase, model: torch.nn.Module, ids: list[int]
) -> tuple[list[int], int]:
    memory = memory_of(model)
    if memory is None or not ids:
        return ids, 0
    query = request.memory_query if request.memory_query is not None else request.prompt
    if request.with_context is not None:
        context = memory.context_for(query)
        if context is None:
            return ids, 0
        rewritten = request.with_context(context, tok)
        added = max(len(rewritten) - len(ids), 0)
    else:
        rewritten, added = rewrite_ids(memory, tok, request.prompt, ids, query)
    limit = _context_length(model)
    if limit is not None and len(rewritten) + request.params.max_new_tokens > limit:
        return ids, 0  # the demonstrations do not fit the model's context: served as sent
    return rewritten, added


def _context_length(model: torch.nn.Module) -> int | None:
    config = getattr(model, "config", None)
    for name in ("max_position_embeddings", "n_positions"):
        length = getattr(config, name, None)
        if isinstance(length, int) and length > 0:
            return length
    return None


def without_context(
    read: list[int], sent: list[int], prompt_logprobs: list[TokenLogprob | None] | None
) -> list[TokenLogprob | None] | None:
    """The logprobs of the prompt as sent (`sent`) from those of the tokens the model read
    (`read`: context, then the prompt, whose first token may have merged with the context's
    last space): the context's rows left out, the first token's none, as any first token."""
    if prompt_logprobs is None or read is sent:
        return prompt_logprobs
    added = len(read) - len(sent)
    rows = prompt_logprobs[added + 1 :]
    if len(rows) != len(sent) - 1 or read[added + 1 :] != sent[1:]:
        return None  # a context inside the prompt (a chat turn): no row is the prompt's
    return [None, *rows]


def token_logprobs(logits: torch.Tensor, tokens: list[int], k: int) -> list[TokenLogprob]:
    """Logprobs of `tokens` under the rows of `logits` (row i predicts tokens[i]), each
    with its `k` likeliest alternatives. One transfer to the host for all rows."""
    if not tokens:
        return []
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    index = torch.tensor(tokens, dtype=torch.long, device=logits.device).unsqueeze(-1)
    chosen = logprobs.gather(-1, index).squeeze(-1).tolist()
    if k <= 0:
        return [TokenLogprob(t, lp) for t, lp in zip(tokens, chosen, strict=True)]
    values, ids = logprobs.topk(min(k, logprobs.shape[-1]), dim=-1)
    tops = [
        tuple(zip(i, v, strict=True)) for i, v in zip(ids.tolist(), values.tolist(), strict=True)
    ]
    return [TokenLogprob(t, lp, top) for t, lp, top in zip(tokens, chosen, tops, strict=True)]


class _Row:
    def __init__(self, request: GenerationRequest, prompt_tokens: int, device: torch.device):
        self.request, self.prompt_tokens = request, prompt_tokens
        self.ids: list[int] = []  # the tokens of `text` (an ending eos is not among them)
        self.picked: list[int] = []  # every picked token, an ending eos too
        self.logprobs: list[TokenLogprob] | None = [] if request.logprobs is not None else None
        self.prompt_logprobs: list[TokenLogprob | None] | None = None
        self.text, self.sent = "", 0
        self.finish: str | None = None
        self.generator: torch.Generator | None = None
        if request.params.temperature > 0:
            self.generator = torch.Generator(device=device)
            seed = request.params.seed
            self.generator.manual_seed(seed if seed is not None else torch.seed())


def _pick(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    if params.temperature <= 0 or generator is None:
        return int(torch.argmax(logits))
    logits = logits.float() / params.temperature
    if params.top_k > 0:
        kth = torch.topk(logits, min(params.top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        outside = torch.cumsum(sorted_probs, 0) - sorted_probs > params.top_p
        sorted_probs = sorted_probs.masked_fill(outside, 0.0)
        probs = torch.zeros_like(probs).scatter(0, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=generator))


def _advance(
    row: _Row,
    token: int,
    tok: PreTrainedTokenizerBase,
    eos: set[int],
    logprob: TokenLogprob | None = None,
) -> None:
    params = row.request.params
    row.picked.append(token)
    if logprob is not None and row.logprobs is not None:
        row.logprobs.append(logprob)
        if row.request.on_logprob:  # before the token's text, so a stream can pair them
            row.request.on_logprob(logprob)
    if token in eos:
        row.finish = "eos"
    else:
        row.ids.append(token)
        row.text = tok.decode(row.ids, skip_special_tokens=True)
        cut = min((row.text.find(s) for s in params.stop if s in row.text), default=-1)
        if cut >= 0:
            row.text, row.finish = row.text[:cut], "stop"
        elif len(row.ids) >= params.max_new_tokens:
            row.finish = "length"
    # stream what is settled: hold back an incomplete multi-byte character, and text that
    # may still turn out to be the start of a stop string
    ready = row.text
    if row.finish is None:
        ready = ready.rstrip("\ufffd")
        for stop in params.stop:
            for k in range(min(len(stop) - 1, len(ready)), 0, -1):
                if ready.endswith(stop[:k]):
                    ready = ready[:-k]
                    break
    if row.request.on_text and len(ready) > row.sent:
        row.request.on_text(ready[row.sent :])
        row.sent = len(ready)


def left_pad(
    encoded: list[list[int]], pad: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and attention mask of `encoded` left-padded to one width: every row's newest
    token sits in the last column, so one decoding step appends one column for all rows."""
    width = max(len(ids) for ids in encoded)
    input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids in encoded], device=device)
    mask = torch.tensor(
        [[0] * (width - len(ids)) + [1] * len(ids) for ids in encoded], device=device
    )
    return input_ids, mask


@torch.no_grad()
def generate_batch(
    model: PreTrainedModel, tok: PreTrainedTokenizerBase, requests: list[GenerationRequest]
) -> list[GenerationOutput]:
    device = next(model.parameters()).device
    with_memory = [encode_with_memory(r, tok, model) for r in requests]
    encoded = [read for read, _ in with_memory]
    rows = [_Row(r, len(ids), device) for r, ids in zip(requests, encoded, strict=True)]
    for row in rows:
        if row.request.params.max_new_tokens <= 0:
            row.finish = "length"
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    input_ids, mask = left_pad(encoded, pad, device)
    eos = eos_ids(model, tok)
    past = None
    step_ids = input_ids
    while any(row.finish is None for row in rows):
        positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, -step_ids.shape[1] :]
        out = model(
            input_ids=step_ids,
            attention_mask=mask,
            position_ids=positions,
            past_key_values=past,
            use_cache=True,
        )
        past = out.past_key_values
        logits = out.logits[:, -1]
        chosen = []
        for index, row in enumerate(rows):
            if row.finish is None:
                token = _pick(logits[index], row.request.params, row.generator)
                _advance(row, token, tok, eos)
                chosen.append(token)
            else:
                chosen.append(pad)
        step_ids = torch.tensor(chosen, device=device).unsqueeze(1)
        mask = torch.cat([mask, torch.ones_like(step_ids)], dim=1)
    return [  # logprobs are the serving loop's (scheduler.py); this static form has none
        GenerationOutput(
            row.text,
            len(row.ids),
            row.finish or "length",
            len(sent),
            token_ids=row.picked,
            prompt_ids=sent,
        )
        for row, (_, sent) in zip(rows, with_memory, strict=True)
    ]
