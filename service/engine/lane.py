"""A lane: one thread that runs operations on one copy of the model, in submission order,
so they never race."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")


class ModelLane:
    def __init__(self, name: str = "model-lane") -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)

    def submit(self, fn: Callable[..., T], *args: object) -> Future[T]:
        return self._executor.submit(fn, *args)

    def call(self, fn: Callable[..., T], *args: object) -> T:
        """Run on the lane and wait (from any thread but the lane's own)."""
        return self.submit(fn, *args).result()

    async def run(self, fn: Callable[..., T], *args: object) -> T:
        return await asyncio.wrap_future(self.submit(fn, *args))

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)
