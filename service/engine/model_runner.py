"""The model runner: owns the served weights and the thread that serves them.

Generation is the only thing that runs on the served model, with one exception: swapping a
finished patch in (or moving to another recorded version), which runs exclusively between
decoding steps once the requests in flight have finished, and takes milliseconds. Edits
are computed elsewhere (workspace.py), so generation never waits for one.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from editors.weight_state import WeightState

from .batcher import GenerationBatcher
from .generation import GenerationOutput, GenerationRequest, generate_batch
from .lane import ModelLane

T = TypeVar("T")


@dataclass
class RunnerState:
    ready: bool = False
    stage: str = "loading"
    error: str | None = None
    started_at: float = field(default_factory=time.monotonic)
    seconds: dict[str, float] = field(default_factory=dict)


class ModelRunner:
    def __init__(
        self,
        model: PreTrainedModel,
        tok: PreTrainedTokenizerBase,
        generate_max_batch: int = 32,
        generate_wait_seconds: float = 0.02,
    ) -> None:
        """`tok` is the serving thread's own tokenizer."""
        self.model, self.tok = model, tok
        self.weights = WeightState(model)
        self.version: Callable[[], int] = lambda: -1  # set by the engine: the served version
        self.lane = ModelLane("serving")
        self.batcher = GenerationBatcher(
            self.lane, self._generate_on_lane, generate_max_batch, generate_wait_seconds
        )

    def close(self) -> None:
        self.lane.close()

    def call(self, fn: Callable[[], T]) -> T:
        """Run `fn` on the served model with no generation in flight (swaps, restores)."""
        return self.lane.call(fn)

    async def run(self, fn: Callable[[], T]) -> T:
        return await self.lane.run(fn)

    async def generate(self, request: GenerationRequest) -> GenerationOutput:
        return await self.batcher.generate(request)

    def _generate_on_lane(self, requests: list[GenerationRequest]) -> list[GenerationOutput]:
        outputs = generate_batch(self.model, self.tok, requests)
        for output in outputs:
            output.version = self.version()
        return outputs
