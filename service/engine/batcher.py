"""Collects concurrent generation requests into batches on the model lane.

Requests that arrive while the lane is busy (with a batch or an edit) wait together and
run as one batch when the lane frees, up to `max_batch` at a time. A batch that would start
with room to spare first waits `wait_seconds` for requests still on their way: clients that
start together then share one batch instead of the first running alone.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from .generation import GenerationOutput, GenerationRequest
from .lane import ModelLane


@dataclass
class _Waiting:
    request: GenerationRequest
    future: asyncio.Future[GenerationOutput]
    loop: asyncio.AbstractEventLoop


class GenerationBatcher:
    def __init__(
        self,
        lane: ModelLane,
        run_batch: Callable[[list[GenerationRequest]], list[GenerationOutput]],
        max_batch: int,
        wait_seconds: float = 0.02,
    ) -> None:
        self.lane, self.run_batch, self.max_batch = lane, run_batch, max_batch
        self.wait_seconds = wait_seconds
        self._waiting: list[_Waiting] = []
        self._lock = threading.Lock()
        self._scheduled = False

    async def generate(self, request: GenerationRequest) -> GenerationOutput:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[GenerationOutput] = loop.create_future()
        with self._lock:
            self._waiting.append(_Waiting(request, future, loop))
        self._schedule()
        return await future

    def _schedule(self) -> None:
        with self._lock:
            if self._scheduled or not self._waiting:
                return
            self._scheduled = True
        self.lane.submit(self._run)

    def _run(self) -> None:
        with self._lock:
            room = len(self._waiting) < self.max_batch
        if room and self.wait_seconds > 0:
            time.sleep(self.wait_seconds)
        with self._lock:
            batch, self._waiting = (
                self._waiting[: self.max_batch],
                self._waiting[self.max_batch :],
            )
        try:
            outputs = self.run_batch([w.request for w in batch])
            for waiting, output in zip(batch, outputs, strict=True):
                waiting.loop.call_soon_threadsafe(_resolve, waiting.future, output, None)
        except Exception as exc:  # every waiting caller gets the error, the lane lives on
            for waiting in batch:
                waiting.loop.call_soon_threadsafe(_resolve, waiting.future, None, exc)
        finally:
            with self._lock:
                self._scheduled = False
            self._schedule()


def _resolve(
    future: asyncio.Future[GenerationOutput],
    output: GenerationOutput | None,
    error: Exception | None,
) -> None:
    if future.done():  # the caller went away
        return
    if error is not None:
        future.set_exception(error)
    else:
        assert output is not None
        future.set_result(output)
