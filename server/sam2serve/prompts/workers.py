"""Prompted calls for an asyncio transport: run on worker threads, bounded, refused while draining.

Any adapter (gRPC, HTTP) awaits `embed` / `segment`; the encoder and decoder never run on the event loop.
A caller that leaves (deadline, cancellation) before its turn takes its call out of the waiting line.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from ..errors import QueueFull, ShuttingDown
from .model import EmbeddedImage, ImageSource, PromptOutcome, PromptRequest
from .segmenter import PromptSegmenter

A = TypeVar("A")
R = TypeVar("R")


class PromptWorkers:
    def __init__(self, segmenter: PromptSegmenter, workers: int = 2, max_waiting: int = 32) -> None:
        self.segmenter = segmenter
        self.workers = max(1, workers)
        self.max_waiting = max(0, max_waiting)
        self._executor = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="sam2serve-prompt")
        self._calls = 0  # running or waiting
        self._in_flight: set[asyncio.Future[Any]] = set()  # the same calls, for a drain to wait on
        self.accepting = True

    @property
    def calls(self) -> int:
        return self._calls

    async def embed(self, source: ImageSource) -> EmbeddedImage:
        return await self._run(self.segmenter.embed, source)

    async def segment(self, request: PromptRequest) -> PromptOutcome:
        return await self._run(self.segmenter.segment, request)

    async def _run(self, call: Callable[[A], R], argument: A) -> R:
        if not self.accepting:
            raise ShuttingDown("the server is shutting down and accepts no new requests")
        if self._calls >= self.workers + self.max_waiting:
            raise QueueFull(f"{self._calls} prompt calls are running or waiting, this server's limit; retry later")
        self._calls += 1
        future = asyncio.get_running_loop().run_in_executor(self._executor, call, argument)
        self._in_flight.add(future)
        try:
            return await future
        finally:
            self._in_flight.discard(future)
            self._calls -= 1

    async def drain(self, timeout_s: float) -> bool:
        """Accept no new calls; wait up to `timeout_s` for those running or waiting to end (True if all did)."""
        self.accepting = False
        if not self._in_flight:
            return True
        _, left = await asyncio.wait(set(self._in_flight), timeout=max(0.0, timeout_s))
        return not left

    def close(self) -> None:
        """Stop accepting; calls not yet started are dropped, running ones finish on their threads."""
        self.accepting = False
        self._executor.shutdown(wait=False, cancel_futures=True)
