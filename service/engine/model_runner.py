"""The model runner: owns the served weights and the serving loop that generates from them.

Generation (continuous batching with a KV cache, scheduler.py) is the only thing that runs
on the served model, with one exception: swapping in a recorded version, which runs
exclusively between decoding steps once the requests in flight have finished, and takes
milliseconds. Edits are computed elsewhere (workspace.py), so generation never waits for one.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from editors.weight_state import WeightState

from .generation import GenerationOutput, GenerationRequest
from .scheduler import ServingLoop

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
        on_tokens: Callable[[int], None] = lambda count: None,
    ) -> None:
        """`tok` is the serving loop's own tokenizer."""
        self.model, self.tok = model, tok
        self.weights = WeightState(model)
        self.version: Callable[[], int] = lambda: -1  # set by the engine: the served version
        self.loop = ServingLoop(
            model,
            tok,
            generate_max_batch,
            version=lambda: self.version(),
            on_tokens=on_tokens,
        )
        self.loop.start()

    def close(self) -> None:
        self.loop.close()

    def call(self, fn: Callable[[], T]) -> T:
        """Run `fn` on the served model with no generation in flight (swaps, restores)."""
        return self.loop.call(fn)

    async def run(self, fn: Callable[[], T]) -> T:
        return await self.loop.run(fn)

    async def generate(self, request: GenerationRequest) -> GenerationOutput:
        return await self.loop.generate(request)
