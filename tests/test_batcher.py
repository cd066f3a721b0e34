"""Concurrent generation requests share batches on the model lane."""

from __future__ import annotations

import asyncio

from service.engine.batcher import GenerationBatcher
from service.engine.generation import GenerationOutput, GenerationRequest
from service.engine.lane import ModelLane


def test_concurrent_requests_run_as_one_batch_each_answer_to_its_caller():
    lane, sizes = ModelLane(), []

    def run_batch(requests):
        sizes.append(len(requests))
        return [GenerationOutput(r.prompt.upper(), 1, "length", 1) for r in requests]

    batcher = GenerationBatcher(lane, run_batch, max_batch=4)

    async def many():
        prompts = [f"prompt {i}" for i in range(10)]
        outputs = await asyncio.gather(*(batcher.generate(GenerationRequest(p)) for p in prompts))
        return prompts, outputs

    prompts, outputs = asyncio.run(many())
    lane.close()
    assert [o.text for o in outputs] == [p.upper() for p in prompts]
    assert sizes == [4, 4, 2]  # at most max_batch, nobody left behind


def test_a_failing_batch_fails_its_callers_and_the_lane_lives_on():
    lane = ModelLane()
    calls = []

    def run_batch(requests):
        calls.append(len(requests))
        if len(calls) == 1:
            raise RuntimeError("out of memory")
        return [GenerationOutput("ok", 1, "length", 1) for _ in requests]

    batcher = GenerationBatcher(lane, run_batch, max_batch=8)

    async def twice():
        first = await asyncio.gather(
            batcher.generate(GenerationRequest("a")), return_exceptions=True
        )
        second = await batcher.generate(GenerationRequest("b"))
        return first, second

    first, second = asyncio.run(twice())
    lane.close()
    assert isinstance(first[0], RuntimeError) and second.text == "ok"
