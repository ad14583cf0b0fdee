"""Calls that wait for their own job (gRPC AutoSegment and Subscribe, fal's synchronous run), whatever the
protocol: the drain waits for them, and a caller that leaves takes its job with it."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol


class Cancels(Protocol):
    async def cancel(self, job_id: str) -> object: ...


@dataclass
class WaitingCall:
    job_id: str | None = None  # set once the job is submitted


class WaitingCalls:
    def __init__(self) -> None:
        self.stopping = False  # set at shutdown where other replicas finish the jobs (a shared queue)
        self._count = 0
        self._changed = asyncio.Condition()

    @contextlib.asynccontextmanager
    async def call(self, queue: Cancels) -> AsyncIterator[WaitingCall]:
        """Count the call while it runs. If it is cancelled (the caller left, its deadline passed) after its
        job was submitted, the job is cancelled too, unless the server is stopping and others run it."""
        call = WaitingCall()
        self._count += 1
        try:
            yield call
        except asyncio.CancelledError:
            await self.leave(queue, call)
            raise
        finally:
            self._count -= 1
            async with self._changed:
                self._changed.notify_all()

    async def leave(self, queue: Cancels, call: WaitingCall) -> None:
        """The caller left before its job ended: cancel the job, unless the server is stopping and others run it."""
        if call.job_id is not None and not self.stopping:
            await asyncio.shield(queue.cancel(call.job_id))

    async def wait_for_none(self, timeout_s: float) -> bool:
        """Wait until no call is waiting for its job (True), or the timeout passes."""
        try:
            async with asyncio.timeout(timeout_s), self._changed:
                await self._changed.wait_for(lambda: self._count == 0)
            return True
        except TimeoutError:
            return False
