"""Continuous (iteration-level) batching: requests join and leave one running batch between
decoding steps, as in vLLM and TGI.

A static batch (generation.py's `generate_batch`) runs until its longest row ends: a short
answer waits for the long one beside it, and a request that arrives a moment after the batch
started waits for the whole batch. Here one daemon thread owns every model call and loops:

1. admit waiting requests, FIFO, while fewer than `max_batch` rows run: prefill the newcomers
   (left-padded) into a cache of their own, pick their first tokens, then concatenate that
   cache into the running one along the batch axis (the narrower side is left-padded on the
   sequence axis, masked out), like TGI's non-paged `Batch.concatenate`;
2. one decoding step for every running row: one new column in the cache and the mask;
3. rows that ended (eos, stop string, token budget, cancelled, or a failing `on_text`) leave:
   their futures resolve at once, their cache rows are index-selected away, and leading
   columns that are padding in every remaining row are dropped (TGI's `Batch.filter`).

Padding is touched only when rows join or leave; a plain step only appends a column. Each
row's position ids count its own tokens (not the padding), so its greedy text is the one it
gets alone.

Exclusive work (`call`/`run`, e.g. swapping edited weights in) and a moved head (`head_moved`,
then `catch_up`) stop admission; the running rows decode to their end ("drain"), the work
runs with nothing in flight, then admission resumes. So every answer comes from one model
version, the one `version()` gave when the request was admitted.

Cache layouts: `DynamicCache` with `DynamicLayer` (full attention: GPT-2, Llama/SmolLM2) and
`DynamicSlidingWindowLayer` (Gemma 3's local layers, which keep only the last
`sliding_window - 1` columns and count the rest in `cumulative_length`) are concatenated and
filtered in place. Any other cache (linear attention, quantised, offloaded, static, ...) falls
back to a correct but slower path: whenever a row joins or leaves, the next step re-encodes
every running row's prompt and generated tokens into a fresh cache.

Cancellation: a request whose `cancelled` event is set (or whose awaiting task is cancelled)
leaves at the next step, and its caller gets `GenerationCancelled`, never a partial answer.

Logprobs: a row that asks for `logprobs` gets a log-softmax of its own logits row at each
step; one that asks for `prompt_logprobs` is prefilled apart from the others, keeping the
logits of every position (not only the last), in groups whose logits stay under
`PROMPT_LOGITS_BUDGET` values. A row with no new tokens to make leaves right after its
prefill. Rows that ask for neither are prefilled and decoded exactly as before.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import inspect
import logging
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel, PreTrainedTokenizerBase
from transformers.cache_utils import DynamicCache, DynamicLayer, DynamicSlidingWindowLayer

from editors.tokens import eos_ids

from .generation import (
    GenerationOutput,
    GenerationRequest,
    _advance,
    _pick,
    _Row,
    encode_with_memory,
    left_pad,
    token_logprobs,
    without_context,
)

T = TypeVar("T")
log = logging.getLogger(__name__)

# most logits (rows x positions x vocabulary) one prefill keeps for prompt logprobs; a row
# longer than this is still prefilled, alone
PROMPT_LOGITS_BUDGET = 2**27


class GenerationCancelled(Exception):
    """The request was cancelled (its `cancelled` event was set) before it finished."""


class ServingLoopClosed(RuntimeError):
    """The serving loop was closed before the request or the exclusive work could run."""


@dataclass
class _Ticket:
    """A request on its way: what the caller awaits, and the event loop to resolve it in."""

    request: GenerationRequest
    future: asyncio.Future[GenerationOutput]
    loop: asyncio.AbstractEventLoop


@dataclass
class _Live:
    """A running row: prompt and picked tokens (the last one not yet fed to the model)."""

    ticket: _Ticket
    row: _Row
    tokens: list[int]
    version: int
    sent: list[int] | None = None  # the prompt as sent, where IKE put context before it


@dataclass
class _Batch:
    """The running rows and their shared state. `mask` is as wide as the cache's sequence
    (`cumulative_length` for sliding layers); `positions` is the position id of each row's
    pending token. `stale`: the cache no longer matches `rows` and the next step rebuilds it."""

    rows: list[_Live] = field(default_factory=list)
    cache: Any = None
    mask: torch.Tensor | None = None
    positions: torch.Tensor | None = None
    stale: bool = False


def _can_merge(cache: Any) -> bool:
    """Whether this module knows the cache's layout well enough to join and filter rows."""
    return (
        type(cache) is DynamicCache
        and not getattr(cache, "offloading", False)
        and len(cache.layers) > 0
        and all(
            type(layer) in (DynamicLayer, DynamicSlidingWindowLayer)
            and layer.is_initialized
            and isinstance(layer.keys, torch.Tensor)
            and layer.keys.dim() == 4
            and not getattr(layer, "record_past", False)
            for layer in cache.layers
        )
    )


def _pad_seq(tensor: torch.Tensor, width: int) -> torch.Tensor:
    """Left-pad the sequence axis (the second to last of keys/values) with zeros."""
    missing = width - tensor.shape[-2]
    return F.pad(tensor, (0, 0, missing, 0)) if missing > 0 else tensor


def _merge(a: _Batch, b: _Batch) -> None:
    """Concatenate `b` (newcomers) below `a` (running rows), in place in `a`. Every new tensor
    is built before any is assigned, so a failure leaves `a` as it was."""
    assert a.mask is not None and b.mask is not None
    assert a.positions is not None and b.positions is not None
    width = max(a.mask.shape[1], b.mask.shape[1])
    mask = torch.cat([F.pad(m, (width - m.shape[1], 0)) for m in (a.mask, b.mask)])
    merged: list[tuple[torch.Tensor, torch.Tensor, int | None]] = []
    for la, lb in zip(a.cache.layers, b.cache.layers, strict=True):
        columns = max(la.keys.shape[-2], lb.keys.shape[-2])  # min(width, window - 1) if sliding
        keys = torch.cat([_pad_seq(la.keys, columns), _pad_seq(lb.keys, columns)])
        values = torch.cat([_pad_seq(la.values, columns), _pad_seq(lb.values, columns)])
        sliding = isinstance(la, DynamicSlidingWindowLayer)
        merged.append((keys, values, width if sliding else None))
    for layer, (keys, values, seen) in zip(a.cache.layers, merged, strict=True):
        layer.keys, layer.values = keys, values
        if seen is not None:
            layer.cumulative_length = seen
    a.mask, a.positions = mask, torch.cat([a.positions, b.positions])
    a.rows = a.rows + b.rows


def _select(batch: _Batch, keep: list[int]) -> None:
    """Keep only rows `keep` of the cache, then drop leading columns that are padding in every
    remaining row (they are never attended to, but every step would still pay for them)."""
    assert batch.mask is not None and batch.positions is not None
    index = torch.tensor(keep, device=batch.mask.device)
    mask = batch.mask.index_select(0, index)
    trim = int(mask.any(0).int().argmax())  # first column that some row attends to
    batch.mask, batch.positions = mask[:, trim:], batch.positions.index_select(0, index)
    for layer in batch.cache.layers:
        keys, values = layer.keys.index_select(0, index), layer.values.index_select(0, index)
        if isinstance(layer, DynamicSlidingWindowLayer):  # holds the last window - 1 columns
            layer.cumulative_length -= trim
            start = keys.shape[-2] - min(layer.cumulative_length, layer.sliding_window - 1)
        else:
            start = trim
        keys, values = keys[..., start:, :], values[..., start:, :]
        layer.keys, layer.values = keys, values  # the next step's torch.cat copies them


class ServingLoop:
    """One thread that owns the model: continuous batching plus exclusive work between steps.

    `version()` names the served weights (read when a request is admitted); `head_moved()`
    says whether a newer version was committed elsewhere, and `catch_up()` loads it (both are
    called on the loop thread, with nothing in flight for `catch_up`)."""

    def __init__(
        self,
        model: PreTrainedModel,
        tok: PreTrainedTokenizerBase,
        max_batch: int = 32,
        version: Callable[[], int] = lambda: -1,
        head_moved: Callable[[], bool] = lambda: False,
        catch_up: Callable[[], None] = lambda: None,
        on_tokens: Callable[[int], None] = lambda count: None,
    ) -> None:
        """`on_tokens(n)`: n tokens were just decoded (one per running row), for metrics."""
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        self.model, self.tok, self.max_batch = model, tok, max_batch
        self.version, self.head_moved, self.catch_up = version, head_moved, catch_up
        self.on_tokens = on_tokens
        self._cond = threading.Condition()
        self._waiting: deque[_Ticket] = deque()
        self._exclusive: deque[tuple[Callable[[], Any], concurrent.futures.Future[Any]]] = deque()
        self._closed = False
        self._thread: threading.Thread | None = None
        self._batch = _Batch()
        self._catch_up_due = False  # the head moved: drain, then catch_up, then admit
        self._eos = eos_ids(model, tok)
        self._pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        self._device = next(model.parameters()).device
        self._vocab = model.get_input_embeddings().weight.shape[0]
        parameters = inspect.signature(model.forward).parameters
        # transformers 5.x renames `past_key_values` to `cache`; the cache is updated in place,
        # so either name works as long as it is the accepted one
        self._cache_arg = "cache" if "cache" in parameters else "past_key_values"
        self._keep_last = {"logits_to_keep": 1} if "logits_to_keep" in parameters else {}

    # -- the public side -------------------------------------------------------------

    def start(self) -> None:
        """Start the loop thread (once); requests and work queued before it run then."""
        with self._cond:
            if self._thread is not None or self._closed:
                return
            self._thread = threading.Thread(target=self._serve, name="serving-loop", daemon=True)
            self._thread.start()

    def close(self) -> None:
        """Stop the loop: callers still waiting (running or queued) get `ServingLoopClosed`.
        From the loop thread itself (a callback) it only asks; the loop ends after the step."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
            thread = self._thread
        if thread is None:
            self._shutdown()
        elif thread is not threading.current_thread():
            thread.join()

    async def generate(self, request: GenerationRequest) -> GenerationOutput:
        """Generate on the running batch. Raises `GenerationCancelled` if the request's
        `cancelled` event is set first; cancelling the awaiting task cancels the request."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[GenerationOutput] = loop.create_future()
        with self._cond:
            if self._closed:
                raise ServingLoopClosed("the serving loop is closed")
            self._waiting.append(_Ticket(request, future, loop))
            self._cond.notify_all()
        try:
            return await future
        except asyncio.CancelledError:
            request.cancelled.set()  # the handler went away: stop spending steps on it
            raise

    def call(self, fn: Callable[[], T]) -> T:
        """Run `fn` on the loop thread with no request in flight, and wait for it (from any
        other thread). Its exception is raised here; the loop lives on."""
        if threading.current_thread() is self._thread:
            raise RuntimeError("call() from the serving loop's own thread would never return")
        return self._submit(fn).result()

    async def run(self, fn: Callable[[], T]) -> T:
        """`call`, awaitable."""
        return await asyncio.wrap_future(self._submit(fn))

    def _submit(self, fn: Callable[[], T]) -> concurrent.futures.Future[T]:
        future: concurrent.futures.Future[T] = concurrent.futures.Future()
        with self._cond:
            if self._closed:
                raise ServingLoopClosed("the serving loop is closed")
            self._exclusive.append((fn, future))
            self._cond.notify_all()
        return future

    # -- the loop thread ------------------------------------------------------------------

    def _serve(self) -> None:
        while True:
            try:
                if not self._tick():
                    break
            except BaseException as exc:  # never die: fail what was running, go on serving
                log.exception("serving loop step failed")
                self._fail_running(exc)
        self._shutdown()

    def _tick(self) -> bool:
        """One round: exclusive work if drained, else admission, then one decoding step."""
        with self._cond:
            while not (
                self._closed
                or self._waiting
                or self._exclusive
                or self._batch.rows
                or self._catch_up_due
            ):
                self._cond.wait()
            if self._closed:
                return False
            for ticket in [t for t in self._waiting if t.request.cancelled.is_set()]:
                self._waiting.remove(ticket)
                _resolve(ticket, None, GenerationCancelled("cancelled before it started"))
            exclusive = bool(self._exclusive) or self._catch_up_due
        self._drop_cancelled()
        fresh = False  # caught up this round: admit without asking head_moved again
        if exclusive:
            if self._batch.rows:
                self._step()  # drain: no admission until the running rows are done
                return True
            fresh = self._run_exclusive()
        with self._cond:
            room = self.max_batch - len(self._batch.rows)
            admit = room > 0 and bool(self._waiting)
        if admit:
            if not fresh and self._moved():
                if self._batch.rows:
                    self._catch_up_due = True
                    self._step()
                    return True
                self._catch_up()
            self._admit(room)
        if self._batch.rows:
            self._step()
        return True

    def _moved(self) -> bool:
        try:
            return bool(self.head_moved())
        except Exception:
            log.exception("head_moved failed; serving the current version")
            return False

    def _catch_up(self) -> None:
        self._catch_up_due = False
        try:
            self.catch_up()
        except Exception:
            log.exception("catch_up failed; serving the current version")

    def _run_exclusive(self) -> bool:
        """Every queued exclusive fn, in submission order, then a due catch-up (-> True)."""
        while True:
            with self._cond:
                if not self._exclusive:
                    break
                fn, future = self._exclusive.popleft()
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn())
            except BaseException as exc:  # the caller gets it; the loop goes on
                future.set_exception(exc)
        if not self._catch_up_due:
            return False
        self._catch_up()
        return True

    def _admit(self, room: int) -> None:
        """Prefill up to `room` waiting requests (FIFO) and merge them into the batch."""
        with self._cond:
            tickets = [self._waiting.popleft() for _ in range(min(room, len(self._waiting)))]
        newcomers: list[_Live] = []
        try:
            version = self.version()
            for ticket in tickets:
                live = self._arrive(ticket, version)
                if live is not None:
                    newcomers.append(live)
            if not newcomers:
                return
            prefilled = [self._prefill(rows, full) for rows, full in self._groups(newcomers)]
        except Exception as exc:  # the newcomers fail; the running rows never saw them
            log.exception("admission failed")
            for ticket in tickets:
                _resolve(ticket, None, exc)
            return
        for fresh, logits in prefilled:
            self._join(fresh, logits)

    def _arrive(self, ticket: _Ticket, version: int) -> _Live | None:
        """A waiting request as a row to prefill, or None if it is already answered."""
        request = ticket.request
        if request.cancelled.is_set():
            _resolve(ticket, None, GenerationCancelled("cancelled before it started"))
            return None
        ids, sent = encode_with_memory(request, self.tok, self.model)
        request.version = version
        row = _Row(request, len(ids), self._device)
        live = _Live(ticket, row, ids, version, sent if sent is not ids else None)
        if request.params.max_new_tokens <= 0 and request.prompt_logprobs is None:
            live.row.finish = "length"
            self._finish(live)
        elif not ids:
            _resolve(ticket, None, ValueError("the prompt encodes to no tokens"))
        elif request.prompt_ids is not None and not all(0 <= t < self._vocab for t in ids):
            _resolve(ticket, None, ValueError("a prompt token id is outside the vocabulary"))
        else:
            return live
        return None

    def _groups(self, rows: list[_Live]) -> list[tuple[list[_Live], bool]]:
        """Prefill groups, each with whether it keeps every position's logits: rows that
        need only their last logits together, rows that score their prompt apart."""
        plain = [live for live in rows if live.row.request.prompt_logprobs is None]
        groups = [(plain, False)] if plain else []
        group: list[_Live] = []
        for live in rows:
            if live.row.request.prompt_logprobs is None:
                continue
            width = max(len(other.tokens) for other in [*group, live])
            if group and (len(group) + 1) * width * self._vocab > PROMPT_LOGITS_BUDGET:
                groups.append((group, True))
                group = []
            group.append(live)
        if group:
            groups.append((group, True))
        return groups

    def _join(self, fresh: _Batch, logits: torch.Tensor) -> None:
        """Rows that only score their prompt leave; the others pick their first tokens and
        join the running batch."""
        scored = [
            i for i, live in enumerate(fresh.rows) if live.row.request.params.max_new_tokens <= 0
        ]
        if scored:
            for index in scored:
                fresh.rows[index].row.finish = "length"
                self._finish(fresh.rows[index])
            keep = [i for i in range(len(fresh.rows)) if i not in scored]
            self._filter(fresh, keep)
            if not keep:
                return
            logits = logits[keep]
        self._pick_and_filter(fresh, logits)
        if not fresh.rows:
            return
        batch = self._batch
        if not batch.rows:
            self._batch = fresh
        elif batch.stale or not (_can_merge(batch.cache) and _can_merge(fresh.cache)):
            batch.rows = batch.rows + fresh.rows
            batch.stale = True
        else:
            try:
                _merge(batch, fresh)
            except Exception as exc:
                log.exception("joining the running batch failed")
                for live in fresh.rows:
                    _resolve(live.ticket, None, exc)

    @torch.no_grad()
    def _prefill(self, rows: list[_Live], full: bool = False) -> tuple[_Batch, torch.Tensor]:
        """Encode `rows`' tokens into a fresh cache: that batch, and each row's last logits.
        `full`: keep every position's logits and score each row's prompt with them."""
        input_ids, mask = left_pad([live.tokens for live in rows], self._pad, self._device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache(config=self.model.config)
        out = self.model(
            input_ids=input_ids,
            attention_mask=mask,
            position_ids=positions,
            use_cache=True,
            **{self._cache_arg: cache},
            **({} if full else self._keep_last),
        )
        last = out.logits[:, -1]
        if full:
            width = input_ids.shape[1]
            for index, live in enumerate(rows):
                count, k = len(live.tokens), live.row.request.prompt_logprobs or 0
                # position p's logits predict token p + 1; the first token has no logprob
                scores = out.logits[index, width - count : width - 1]
                live.row.prompt_logprobs = [None, *token_logprobs(scores, live.tokens[1:], k)]
            last = last.clone()  # not a view: the full logits are freed on return
        return _Batch(list(rows), cache, mask, mask.sum(-1, keepdim=True)), last

    @torch.no_grad()
    def _step(self) -> None:
        """One decoding step for every running row (a full re-encode if the cache is stale)."""
        batch = self._batch
        try:
            if batch.stale:
                rebuilt, logits = self._prefill(batch.rows)
                batch.cache, batch.mask, batch.positions = (
                    rebuilt.cache,
                    rebuilt.mask,
                    rebuilt.positions,
                )
                batch.stale = False
            else:
                assert batch.mask is not None and batch.positions is not None
                pending = torch.tensor(
                    [[live.tokens[-1]] for live in batch.rows], device=self._device
                )
                mask = torch.cat([batch.mask, torch.ones_like(pending)], dim=1)
                out = self.model(
                    input_ids=pending,
                    attention_mask=mask,
                    position_ids=batch.positions,
                    use_cache=True,
                    **{self._cache_arg: batch.cache},
                    **self._keep_last,
                )
                batch.mask, batch.positions = mask, batch.positions + 1
                logits = out.logits[:, -1]
        except Exception as exc:  # every row of this step fails; later requests are served
            log.exception("decoding step failed")
            self._fail_running(exc)
            return
        self._pick_and_filter(batch, logits)

    def _pick_and_filter(self, batch: _Batch, logits: torch.Tensor) -> None:
        """Pick each row's next token, resolve the rows that ended, drop them from `batch`."""
        greedy = logits.argmax(-1).tolist()  # one call for every greedy row
        with contextlib.suppress(Exception):
            self.on_tokens(len(batch.rows))
        keep: list[int] = []
        for index, live in enumerate(batch.rows):
            row = live.row
            try:
                if row.generator is None:
                    token = greedy[index]
                else:
                    token = _pick(logits[index], row.request.params, row.generator)
                entry, k = None, row.request.logprobs
                if k is not None:  # only rows that ask pay for a log-softmax
                    (entry,) = token_logprobs(logits[index : index + 1], [token], k)
                live.tokens.append(token)
                _advance(row, token, self.tok, self._eos, entry)
            except Exception as exc:  # e.g. a failing on_text: this row only
                row.finish = row.finish or "error"
                _resolve(live.ticket, None, exc)
                continue
            if row.finish is not None:
                self._finish(live)
            else:
                keep.append(index)
        self._filter(batch, keep)

    def _drop_cancelled(self) -> None:
        batch = self._batch
        keep = [i for i, live in enumerate(batch.rows) if not live.row.request.cancelled.is_set()]
        if len(keep) < len(batch.rows):
            for live in batch.rows:
                if live.row.request.cancelled.is_set():
                    _resolve(live.ticket, None, GenerationCancelled("cancelled"))
            self._filter(batch, keep)

    def _filter(self, batch: _Batch, keep: list[int]) -> None:
        if len(keep) == len(batch.rows):
            return
        if not keep:
            batch.rows, batch.cache, batch.mask, batch.positions = [], None, None, None
            batch.stale = False
            return
        batch.rows = [batch.rows[i] for i in keep]
        if batch.stale or not _can_merge(batch.cache):
            batch.stale = True
            return
        try:
            _select(batch, keep)
        except Exception:  # a half-filtered cache is rebuilt from the rows' tokens
            log.exception("filtering the batch failed; rebuilding its cache")
            batch.stale = True

    def _finish(self, live: _Live) -> None:
        row = live.row
        read = live.tokens[: row.prompt_tokens]
        sent = live.sent if live.sent is not None else read  # `tokens` grows: not `read` itself
        output = GenerationOutput(
            row.text,
            len(row.ids),
            row.finish or "length",
            len(sent),
            live.version,
            token_ids=row.picked,
            prompt_ids=sent,
            logprobs=row.logprobs,
            prompt_logprobs=(
                row.prompt_logprobs
                if live.sent is None
                else without_context(read, sent, row.prompt_logprobs)
            ),
        )
        _resolve(live.ticket, output, None)

    def _fail_running(self, exc: BaseException) -> None:
        for live in self._batch.rows:
            _resolve(live.ticket, None, exc)
        self._batch = _Batch()

    def _shutdown(self) -> None:
        """Fail everything still pending (after the loop ended, or if it never started)."""
        closed = ServingLoopClosed("the serving loop was closed")
        self._fail_running(closed)
        with self._cond:
            waiting, self._waiting = list(self._waiting), deque()
            exclusive, self._exclusive = list(self._exclusive), deque()
        for ticket in waiting:
            _resolve(ticket, None, closed)
        for _, future in exclusive:
            if future.set_running_or_notify_cancel():
                future.set_exception(closed)


def _resolve(ticket: _Ticket, output: GenerationOutput | None, error: BaseException | None) -> None:
    """Hand the answer to the caller's event loop (a closed loop means nobody listens)."""

    def settle() -> None:
        if ticket.future.done():  # the caller went away
            return
        if error is not None:
            ticket.future.set_exception(error)
        else:
            ticket.future.set_result(output)  # type: ignore[arg-type]

    with contextlib.suppress(RuntimeError):
        ticket.loop.call_soon_threadsafe(settle)
