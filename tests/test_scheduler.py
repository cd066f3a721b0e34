"""The serving loop: continuous batching on one thread, exclusive work between its steps.

Requests are staggered deterministically: a request's `on_text` holds the loop thread at its
n-th piece until the test has queued the next request, so the next one joins a batch that is
mid-generation. Timeouts below only guard against a hung loop; nothing is timed.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pytest
import torch
import transformers as tf

from editors.models import load_model
from editors.tiny import tiny_random_model
from service.engine import scheduler
from service.engine.generation import (
    GenerationOutput,
    GenerationRequest,
    SamplingParams,
    generate_batch,
)
from service.engine.scheduler import GenerationCancelled, ServingLoop, ServingLoopClosed

from .conftest import CACHE

HANG = 120.0  # seconds: only a guard against a hung loop, never a bound on speed

PROMPTS = [
    "Hi",
    "The mother tongue of Danielle Darrieux is French; she was born in Bordeaux, a port city "
    "in the south west of France, on the river",
    "The Eiffel Tower is located in the city of",
    "Michael Jordan plays the sport of",
]


def greedy(tokens: int, stop: tuple[str, ...] = ()) -> SamplingParams:
    return SamplingParams(max_new_tokens=tokens, stop=stop)


def alone(model, tok, prompt: str, params: SamplingParams) -> GenerationOutput:
    return generate_batch(model, tok, [GenerationRequest(prompt, params)])[0]


@contextlib.contextmanager
def serving(model, tok, start: bool = True, **options) -> Iterator[ServingLoop]:
    """A started loop (or one to start once the test has queued its requests: then they
    are all waiting when the loop first looks)."""
    loop = ServingLoop(model, tok, **options)
    if start:
        loop.start()
    try:
        yield loop
    finally:
        loop.close()


@dataclass
class Forwards:
    """Every model call the loop makes: rows, query length, mask width, whether the mask is
    all ones, and whether it is a prefill (an empty cache)."""

    calls: list[tuple[int, int, int, bool, bool]] = field(default_factory=list)
    fail: Callable[[bool], bool] = lambda prefill: False

    def hook(self, module, args, kwargs) -> None:
        ids, mask = kwargs["input_ids"], kwargs["attention_mask"]
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        prefill = cache.get_seq_length() == 0
        self.calls.append((ids.shape[0], ids.shape[1], mask.shape[1], bool(mask.all()), prefill))
        if self.fail(prefill):
            raise RuntimeError("injected model failure")

    @property
    def prefills(self) -> list[tuple[int, int, int, bool, bool]]:
        return [c for c in self.calls if c[4]]

    @property
    def steps(self) -> list[tuple[int, int, int, bool, bool]]:
        return [c for c in self.calls if not c[4]]


@contextlib.contextmanager
def forwards(model) -> Iterator[Forwards]:
    record = Forwards()
    handle = model.register_forward_pre_hook(record.hook, with_kwargs=True)
    try:
        yield record
    finally:
        handle.remove()


class Gate:
    """An `on_text` that holds the loop thread at its `at`-th piece until `open()`."""

    def __init__(self, at: int, inner: Callable[[str], None] | None = None) -> None:
        self.at, self.inner, self.pieces = at, inner, []
        self.loop = asyncio.get_running_loop()
        self.reached = asyncio.Event()
        self.released = threading.Event()
        self.held_too_long = False

    def __call__(self, piece: str) -> None:
        self.pieces.append(piece)
        if self.inner:
            self.inner(piece)
        if len(self.pieces) == self.at:
            self.loop.call_soon_threadsafe(self.reached.set)
            self.held_too_long = not self.released.wait(HANG)

    def open(self) -> None:
        self.released.set()


async def queued(coroutine) -> asyncio.Task:
    """Start `coroutine` (a `generate` or `run`) and return once its work is queued: a task's
    body runs up to its first await on the next event-loop turn, which sleep(0) yields."""
    task = asyncio.ensure_future(coroutine)
    await asyncio.sleep(0)
    return task


async def until(event: asyncio.Event, task: asyncio.Task) -> None:
    """Wait for `event`, or for `task` to end first (then there is nothing to wait for)."""
    waiter = asyncio.ensure_future(event.wait())
    await asyncio.wait([waiter, task], timeout=HANG, return_when=asyncio.FIRST_COMPLETED)
    waiter.cancel()


async def staggered(loop: ServingLoop, groups: list[list[GenerationRequest]]) -> list:
    """Each group is queued while the first request of the group before it is mid-generation
    (held at its 2nd piece), so every group joins a running batch; a group's requests are
    admitted together. Returns outputs (or exceptions), in order."""
    gates = []
    for group in groups:
        gates.append(Gate(2, group[0].on_text))
        group[0].on_text = gates[-1]
    tasks: list[asyncio.Task] = []
    for index, group in enumerate(groups):
        if index:
            await until(gates[index - 1].reached, tasks[-len(groups[index - 1])])
        tasks += [await queued(loop.generate(request)) for request in group]
        if index:
            gates[index - 1].open()
    for gate in gates:
        gate.open()
    done = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), HANG)
    assert not any(gate.held_too_long for gate in gates)
    return done


def run(coroutine_fn: Callable[[], object]) -> object:
    return asyncio.run(coroutine_fn())


# -- models --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gpt2(tiny_model_dir):
    """The suite's tiny random GPT-2 (full-attention `DynamicLayer`s)."""
    return load_model(str(tiny_model_dir))


def tiny_gemma3(vocab: int):
    """A tiny random Gemma 3 whose local layers keep a 6-token window, so short prompts
    already exercise `DynamicSlidingWindowLayer` past its window."""
    torch.manual_seed(0)
    config = tf.Gemma3TextConfig(
        num_hidden_layers=4,
        hidden_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        intermediate_size=128,
        vocab_size=vocab,
        sliding_window=6,
        layer_types=["sliding_attention", "full_attention"] * 2,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=0,
    )
    return tf.Gemma3ForCausalLM(config).eval().requires_grad_(False)


@pytest.fixture(scope="module", params=["gpt2", "llama", "gemma3-sliding", "gpt2-no-merge"])
def tiny(request, gpt2, gpt2_tok):
    """Each tiny model family, and GPT-2 on the fallback path (caches never merged)."""
    if request.param in ("gpt2", "gpt2-no-merge"):
        return (*gpt2, request.param == "gpt2-no-merge")
    if request.param == "llama":
        return tiny_random_model("llama", len(gpt2_tok)), gpt2_tok, False
    return tiny_gemma3(len(gpt2_tok)), gpt2_tok, False


@functools.cache
def real_model(name: str):
    return load_model(name, CACHE)


def mixed_requests(model, tok) -> tuple[list[GenerationRequest], list[GenerationOutput]]:
    """Mixed prompt lengths and budgets, a stop string and a seeded sampled row, with the
    output each gets alone. The long prompt joins a shorter running row and, with the
    smallest budget, leaves first; the last two are admitted together."""
    stop_source = alone(model, tok, PROMPTS[2], greedy(16)).text
    stop = (stop_source[6:9],) if len(stop_source) >= 9 else ()
    params = [
        greedy(24),
        greedy(5),
        greedy(16, stop),
        SamplingParams(max_new_tokens=12, temperature=0.8, top_k=40, top_p=0.9, seed=7),
    ]
    expected = [alone(model, tok, p, s) for p, s in zip(PROMPTS, params, strict=True)]
    return [GenerationRequest(p, s) for p, s in zip(PROMPTS, params, strict=True)], expected


def assert_like_alone(model, tok, merge: bool = True) -> None:
    requests, expected = mixed_requests(model, tok)
    streamed = [[] for _ in requests]
    for request, pieces in zip(requests, streamed, strict=True):
        request.on_text = pieces.append
    groups = [requests[:1], requests[1:2], requests[2:]]
    with forwards(model) as record, serving(model, tok) as loop:
        outputs = run(lambda: staggered(loop, groups))
    for output, want, pieces in zip(outputs, expected, streamed, strict=True):
        assert isinstance(output, GenerationOutput), output
        assert (output.text, output.tokens, output.finish_reason) == (
            want.text,
            want.tokens,
            want.finish_reason,
        )
        assert "".join(pieces) == output.text
    assert max(rows for rows, *_ in record.calls) >= 3  # they joined a running batch
    if merge:
        # one prefill per group proves no join re-encoded the batch (the fallback does) ...
        assert [rows for rows, *_ in record.prefills] == [len(g) for g in groups]
        # ... and a row left alone has no padding column: finished rows' columns were dropped
        assert all(ones for rows, _, _, ones, _ in record.steps if rows == 1)
    else:
        assert len(record.prefills) > len(groups)


# -- 6. greedy text equals the text each prompt gets alone ---------------------------------


def test_rows_joining_mid_flight_get_the_text_they_get_alone(tiny, monkeypatch):
    model, tok, no_merge = tiny
    if no_merge:
        monkeypatch.setattr(scheduler, "_can_merge", lambda cache: False)
    assert_like_alone(model, tok, merge=not no_merge)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["smollm2-135m-instruct", "gemma3-270m"])
def test_real_models_rows_joining_mid_flight_get_the_text_they_get_alone(name):
    model, tok = real_model(name)
    assert_like_alone(model, tok)


# -- 1. join at the next step, leave when finished, at most max_batch rows ----------------


def test_a_short_request_is_answered_while_a_long_one_still_runs(gpt2):
    model, tok = gpt2

    async def scenario():
        with serving(model, tok, start=False) as loop:
            long_gate = Gate(8)
            long = await queued(loop.generate(GenerationRequest(PROMPTS[1], greedy(30), long_gate)))
            short = await queued(loop.generate(GenerationRequest(PROMPTS[2], greedy(3))))
            loop.start()
            # the long row is held at its 8th piece until the short answer is in our hands:
            # were answers only handed out at the end of the batch, this would never return
            answer = await asyncio.wait_for(short, HANG)
            pieces_then = len(long_gate.pieces)
            long_gate.open()
            return answer, pieces_then, await asyncio.wait_for(long, HANG), long_gate

    answer, pieces_then, long_answer, gate = run(scenario)
    assert answer.tokens == 3 and long_answer.tokens == 30
    assert pieces_then < 30 and not gate.held_too_long


def test_at_most_max_batch_rows_run_and_the_others_wait_in_order(gpt2):
    model, tok = gpt2
    budgets = [6, 12, 4, 4, 4]

    async def scenario():
        with forwards(model) as record, serving(model, tok, False, max_batch=2) as loop:
            requests = [
                GenerationRequest(" ".join(["word"] * (i + 1)), greedy(n))
                for i, n in enumerate(budgets)
            ]
            tasks = [await queued(loop.generate(r)) for r in requests]
            loop.start()
            return await asyncio.wait_for(asyncio.gather(*tasks), HANG), record

    outputs, record = run(scenario)
    assert [o.tokens for o in outputs] == budgets
    assert max(rows for rows, *_ in record.calls) <= 2
    # prompt i has i + 1 words: the prefills' widths show the admission order
    first = record.prefills[0]
    assert first[:2] == (2, 2)  # the first two together
    assert [width for _, width, *_ in record.prefills[1:]] == [3, 4, 5]


# -- 2. exclusive work drains the batch and runs with nothing in flight -------------------


def test_exclusive_work_waits_for_running_rows_and_holds_new_ones_back(gpt2):
    model, tok = gpt2
    events: list[str] = []
    served = {"version": 1}

    def swap() -> str:
        events.append("swap")
        served["version"] = 2
        return "swapped"

    async def scenario():
        with serving(model, tok, version=lambda: served["version"]) as loop:
            gate = Gate(3, lambda _: events.append("old"))
            old = await queued(loop.generate(GenerationRequest(PROMPTS[1], greedy(20), gate)))
            await until(gate.reached, old)
            swapped = await queued(loop.run(swap))
            new = await queued(
                loop.generate(
                    GenerationRequest(PROMPTS[2], greedy(6), lambda _: events.append("new"))
                )
            )
            gate.open()
            return await asyncio.wait_for(asyncio.gather(old, swapped, new), HANG)

    old, swapped, new = run(scenario)
    assert swapped == "swapped"
    assert old.tokens == 20 and old.version == 1  # the running row finished on the old weights
    assert new.version == 2  # the waiting one was admitted after the swap
    assert events.index("swap") == events.count("old")  # nothing of "old" after the swap
    assert events.count("new") > 0 and all(e == "new" for e in events[events.index("swap") + 1 :])


def test_exclusive_work_runs_in_order_its_errors_reach_the_caller_and_the_loop_lives_on(gpt2):
    model, tok = gpt2
    order: list[int] = []

    def fail() -> None:
        raise ValueError("bad patch")

    async def scenario():
        with serving(model, tok) as loop:
            # from another thread, blocking: `call`
            first = asyncio.to_thread(loop.call, lambda: order.append(1) or "one")
            results = await asyncio.gather(
                first,
                loop.run(lambda: order.append(2)),
                loop.run(fail),
                loop.run(lambda: order.append(3)),
                return_exceptions=True,
            )
            after = await loop.generate(GenerationRequest(PROMPTS[3], greedy(4)))
            with pytest.raises(RuntimeError, match="own thread"):
                await loop.run(lambda: loop.call(lambda: None))
            return results, after

    results, after = run(scenario)
    assert results[0] == "one" and isinstance(results[2], ValueError)
    assert sorted(order) == [1, 2, 3] and order.index(2) < order.index(3)
    assert after.tokens == 4


# -- 3. a moved head: drain, catch up, then admit -----------------------------------------


def test_a_moved_head_drains_the_batch_then_catches_up_before_admitting(gpt2):
    model, tok = gpt2
    events: list[str] = []
    head = {"moved": False, "asked": 0, "version": 1}

    def head_moved() -> bool:
        head["asked"] += 1
        return head["moved"]

    def catch_up() -> None:
        events.append("catch_up")
        head["moved"], head["version"] = False, 2

    async def scenario():
        with serving(
            model, tok, version=lambda: head["version"], head_moved=head_moved, catch_up=catch_up
        ) as loop:
            gate = Gate(3, lambda _: events.append("old"))
            old = await queued(loop.generate(GenerationRequest(PROMPTS[1], greedy(20), gate)))
            await until(gate.reached, old)
            asked_while_running = head["asked"]
            head["moved"] = True  # a writer committed version 2
            new = await queued(
                loop.generate(
                    GenerationRequest(PROMPTS[2], greedy(6), lambda _: events.append("new"))
                )
            )
            gate.open()
            return asked_while_running, await asyncio.wait_for(asyncio.gather(old, new), HANG)

    asked_while_running, (old, new) = run(scenario)
    assert asked_while_running == 1  # once for the first admission, not at every step
    assert head["asked"] == 2  # and once more for the second
    assert old.version == 1 and old.tokens == 20 and new.version == 2
    assert events.count("catch_up") == 1
    assert events.index("catch_up") == events.count("old")
    assert all(e == "new" for e in events[events.index("catch_up") + 1 :])


def test_failing_head_moved_or_catch_up_is_logged_and_serving_goes_on(gpt2, caplog):
    model, tok = gpt2

    def broken() -> bool:
        raise ConnectionError("ledger unreachable")

    def broken_catch_up() -> None:
        raise ConnectionError("ledger unreachable")

    async def scenario(**callbacks):
        with serving(model, tok, version=lambda: 7, **callbacks) as loop:
            return await asyncio.wait_for(
                loop.generate(GenerationRequest(PROMPTS[3], greedy(4))), HANG
            )

    first = run(lambda: scenario(head_moved=broken))
    second = run(lambda: scenario(head_moved=lambda: True, catch_up=broken_catch_up))
    assert first.tokens == second.tokens == 4 and first.version == second.version == 7
    assert "head_moved failed" in caplog.text and "catch_up failed" in caplog.text


# -- 4. cancellation -------------------------------------------------------------------------


def test_a_cancelled_request_stops_generating_within_a_step_or_two(gpt2):
    model, tok = gpt2
    request = GenerationRequest(PROMPTS[1], greedy(200))
    pieces: list[str] = []
    calls_at_cancel: list[int] = []

    async def scenario():
        with forwards(model) as record, serving(model, tok) as loop:

            def on_text(piece: str) -> None:
                pieces.append(piece)
                if len(pieces) == 3:
                    request.cancelled.set()  # e.g. the SSE client disconnected
                    calls_at_cancel.append(len(record.calls))

            request.on_text = on_text
            with pytest.raises(GenerationCancelled):
                await asyncio.wait_for(loop.generate(request), HANG)
            calls_to_cancelled = len(record.calls) - calls_at_cancel[0]
            after = await loop.generate(GenerationRequest(PROMPTS[3], greedy(4)))
            return calls_to_cancelled, after

    calls_to_cancelled, after = run(scenario)
    assert len(pieces) == 3  # no piece after the cancel ...
    assert calls_to_cancelled <= 2  # ... and no more than a couple of model calls for it
    assert after.tokens == 4  # the loop serves on


def test_cancelling_the_awaiting_task_drops_the_row(gpt2):
    model, tok = gpt2
    at_cancel: list[int] = []

    async def scenario():
        with forwards(model) as record, serving(model, tok) as loop:
            gate = Gate(3)
            request = GenerationRequest(PROMPTS[1], greedy(200), gate)
            task = await queued(loop.generate(request))
            await until(gate.reached, task)
            task.cancel()  # the HTTP handler's task was cancelled
            with pytest.raises(asyncio.CancelledError):
                await task
            at_cancel.append(len(record.calls))
            gate.open()
            # exclusive work runs only once no row is in flight: so the row has left
            await asyncio.wait_for(loop.run(lambda: None), HANG)
            return record, request, gate

    record, request, gate = run(scenario)
    assert request.cancelled.is_set()
    assert len(record.calls) - at_cancel[0] <= 2 and len(gate.pieces) <= 5


# -- 5. model failures fail their rows only ----------------------------------------------


def test_a_failing_step_fails_its_rows_and_later_requests_are_served(gpt2):
    model, tok = gpt2
    want = alone(model, tok, PROMPTS[3], greedy(6))

    async def scenario():
        with forwards(model) as record, serving(model, tok) as loop:
            record.fail = lambda prefill: not prefill  # every decoding step fails
            failed = await asyncio.gather(
                loop.generate(GenerationRequest(PROMPTS[1], greedy(8))),
                loop.generate(GenerationRequest(PROMPTS[2], greedy(8))),
                return_exceptions=True,
            )
            record.fail = lambda prefill: False
            return failed, await loop.generate(GenerationRequest(PROMPTS[3], greedy(6)))

    failed, later = run(scenario)
    assert all(isinstance(f, RuntimeError) for f in failed)
    assert later.text == want.text


def test_a_failing_prefill_fails_the_newcomer_and_the_running_row_goes_on(gpt2):
    model, tok = gpt2
    want = alone(model, tok, PROMPTS[1], greedy(16))

    async def scenario():
        with forwards(model) as record, serving(model, tok) as loop:
            gate = Gate(3)
            running = await queued(loop.generate(GenerationRequest(PROMPTS[1], greedy(16), gate)))
            await until(gate.reached, running)
            record.fail = lambda prefill: prefill  # prefills fail from now on
            newcomer = await queued(loop.generate(GenerationRequest(PROMPTS[2], greedy(4))))
            gate.open()
            return await asyncio.gather(running, newcomer, return_exceptions=True)

    running, newcomer = run(scenario)
    assert isinstance(newcomer, RuntimeError)
    assert isinstance(running, GenerationOutput) and running.text == want.text


def test_a_failing_on_text_fails_only_its_own_row(gpt2):
    model, tok = gpt2
    want = alone(model, tok, PROMPTS[2], greedy(8))

    def broken(piece: str) -> None:
        raise BrokenPipeError("client gone")

    async def scenario():
        with serving(model, tok) as loop:
            return await asyncio.gather(
                loop.generate(GenerationRequest(PROMPTS[1], greedy(8), broken)),
                loop.generate(GenerationRequest(PROMPTS[2], greedy(8))),
                return_exceptions=True,
            )

    failed, served = run(scenario)
    assert isinstance(failed, BrokenPipeError) and served.text == want.text


# -- 7. close ends the thread; pending callers get an error --------------------------------


def test_close_fails_pending_callers_ends_the_thread_and_is_idempotent(gpt2):
    model, tok = gpt2
    loop = ServingLoop(model, tok, max_batch=1)
    ran: list[str] = []
    pieces: list[str] = []

    def close_at_third_piece(piece: str) -> None:
        pieces.append(piece)
        if len(pieces) == 3:
            loop.close()  # from the loop thread (a callback): the loop stops after this step

    async def scenario():
        gate = Gate(2, close_at_third_piece)
        running = await queued(loop.generate(GenerationRequest(PROMPTS[1], greedy(50), gate)))
        waiting = await queued(loop.generate(GenerationRequest(PROMPTS[2], greedy(5))))
        loop.start()
        await until(gate.reached, running)
        exclusive = await queued(loop.run(lambda: ran.append("swap")))  # waits for the drain
        gate.open()
        return await asyncio.wait_for(
            asyncio.gather(running, waiting, exclusive, return_exceptions=True), HANG
        )

    outcomes = run(scenario)
    loop.close()  # from another thread: joins; again: nothing left to do
    loop.close()
    assert loop._thread is not None and not loop._thread.is_alive()
    assert all(isinstance(o, ServingLoopClosed) for o in outcomes) and not ran
    with pytest.raises(ServingLoopClosed):
        run(lambda: loop.generate(GenerationRequest("x")))
    with pytest.raises(ServingLoopClosed):
        loop.call(lambda: None)
