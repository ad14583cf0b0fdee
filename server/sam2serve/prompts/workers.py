"""Prompted calls for an asyncio transport: run on worker threads, bounded, refused while draining.

Any adapter (gRPC, HTTP) awaits `embed` / `segment`; the encoder and decoder never run on the event loop.
A caller that leaves (deadline, cancellation) before its turn takes its call out of the waiting line.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol, TypeVar

from ..errors import QueueFull, ShuttingDown
from ..inputs import fetch_url
from .model import EmbeddedImage, ImageSource, PromptOutcome, PromptRequest
from .segmenter import PromptSegmenter
from .validate import check_prompts

A = TypeVar("A")
R = TypeVar("R")
T = TypeVar("T")


class FetchStage(Protocol):
    """Runs downloads apart from the compute workers (`jobs.Worker.fetch`)."""

    async def fetch(self, download: Callable[[], T]) -> T: ...


class PromptWorkers:
    def __init__(self, segmenter: PromptSegmenter, workers: int = 2, max_waiting: int = 32,
                 fetch_stage: FetchStage | None = None) -> None:
        """`fetch_stage`: where image_url downloads run (the job queue's), so that a slow upstream never holds
        a prompt worker; None: the prompt workers download themselves."""
        self.segmenter = segmenter
        self._fetch_stage = fetch_stage
        self.workers = max(1, workers)
        self.max_waiting = max(0, max_waiting)
        self._executor = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="sam2serve-prompt")
        self._calls = 0  # running or waiting
        self._idle = asyncio.Event()  # no call running or waiting, for a drain to wait on
        self._idle.set()
        self.accepting = True

    @property
    def calls(self) -> int:
        return self._calls

    async def embed(self, source: ImageSource) -> EmbeddedImage:
        return await self._run(self.segmenter.embed, source, lambda fetched: fetched)

    async def segment(self, request: PromptRequest) -> PromptOutcome:
        check_prompts(request, self.segmenter.limits)  # before any download (the segmenter checks again)
        return await self._run(self.segmenter.segment, request.image,
                               lambda fetched: dataclasses.replace(request, image=fetched))

    async def _run(self, call: Callable[[A], R], source: ImageSource, argument: Callable[[ImageSource], A]) -> R:
        if not self.accepting:
            raise ShuttingDown("the server is shutting down and accepts no new requests")
        if self._calls >= self.workers + self.max_waiting:
            raise QueueFull(f"{self._calls} prompt calls are running or waiting, this server's limit; retry later")
        self._calls += 1
        self._idle.clear()
        try:
            downloaded = await self._downloaded(source)
            return await asyncio.get_running_loop().run_in_executor(self._executor, call, argument(downloaded))
        finally:
            self._calls -= 1
            if not self._calls:
                self._idle.set()

    async def _downloaded(self, source: ImageSource) -> ImageSource:
        """`source`, with an image_url's body downloaded in the fetch stage."""
        if self._fetch_stage is None or source.kind not in ("url", "image_url") or not isinstance(source.value, str):
            return source
        url, limits = source.value, self.segmenter.input_limits
        body = await self._fetch_stage.fetch(lambda: fetch_url(url, limits))
        return dataclasses.replace(source, fetched=body)

    async def drain(self, timeout_s: float) -> bool:
        """Accept no new calls; wait up to `timeout_s` for those running or waiting to end (True if all did)."""
        self.accepting = False
        try:
            async with asyncio.timeout(max(0.0, timeout_s)):
                await self._idle.wait()
            return True
        except TimeoutError:
            return False

    def close(self) -> None:
        """Stop accepting; calls not yet started are dropped, running ones finish on their threads."""
        self.accepting = False
        self._executor.shutdown(wait=False, cancel_futures=True)
