"""The data plane every protocol adapter (gRPC today) calls: submit, status, watch, result, cancel, and
run-now for callers that wait on their job, over one store and its worker. Nothing here knows a protocol."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from ..domain import SegmentRequest
from .model import CancelOutcome, JobResult, JobSnapshot, shutting_down
from .store import JobStore
from .worker import Worker


class JobService:
    def __init__(self, store: JobStore, worker: Worker) -> None:
        self.store, self.worker = store, worker
        self._accepting = True
        self._stopping = False  # calls cut from here on leave their jobs to the replicas that run them
        self._waiting_calls = 0
        self._calls_changed = asyncio.Condition()

    @property
    def shared(self) -> bool:
        """Other replicas run this queue's jobs too."""
        return self.store.shared

    async def start(self) -> None:
        await self.store.start()
        self.worker.start()

    # -- the calls -----------------------------------------------------------------------------------------
    async def submit(self, request: SegmentRequest) -> JobSnapshot:
        if not self._accepting:
            raise shutting_down()
        return await self.store.add(request)

    async def status(self, job_id: str) -> JobSnapshot:
        return await self.store.snapshot(job_id)

    def watch(self, job_id: str) -> AsyncIterator[JobSnapshot]:
        """The current state, then every change, ending with a terminal state."""
        return self.store.changes(job_id)

    async def wait(self, job_id: str) -> JobSnapshot:
        async with contextlib.aclosing(self.store.changes(job_id)) as snapshots:
            async for snapshot in snapshots:
                if snapshot.state.terminal:
                    return snapshot
        raise AssertionError("a job's changes end with a terminal state")

    async def result(self, job_id: str) -> JobResult:
        return await self.store.result(job_id)

    async def cancel(self, job_id: str) -> tuple[CancelOutcome, JobSnapshot]:
        return await self.store.cancel(job_id)

    @contextlib.asynccontextmanager
    async def attached(self, request: SegmentRequest) -> AsyncIterator[JobSnapshot]:
        """Submit a job for a caller that stays to see it end: the drain waits for it, and if the caller
        leaves (its deadline, a cancelled call) the job is cancelled, unless this server is stopping and the
        job is one other replicas run."""
        async with self._waiting_call():
            submitted = await self.submit(request)
            try:
                yield submitted
            except asyncio.CancelledError:
                if not self._stopping:
                    await asyncio.shield(self.cancel(submitted.id))
                raise

    async def run(self, request: SegmentRequest) -> JobResult:
        """Run-now: submit, wait for the end, and return the result (or raise the job's error)."""
        async with self.attached(request) as job:
            await self.wait(job.id)
            return await self.result(job.id)

    def depth(self) -> tuple[float, int]:
        """(jobs waiting, as this replica's share; jobs running here); safe to call from any thread."""
        return self.store.waiting(), self.worker.running

    # -- stopping ------------------------------------------------------------------------------------------
    async def drain(self, timeout_s: float) -> bool:
        """Refuse new jobs; within `timeout_s`, let the worker finish its jobs (in-process: the queued ones
        too), then let waiting calls whose jobs run elsewhere see them end. True if everything finished."""
        self._accepting = False
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        drained = await self.worker.drain(timeout_s)
        drained = await self._wait_for_waiting_calls(max(0.0, deadline - loop.time())) and drained
        self._stopping = self.shared  # in-process jobs stop with the calls that wait on them
        return drained

    async def close(self) -> None:
        self._accepting = False
        await self.worker.close()
        await self.store.close()

    async def _wait_for_waiting_calls(self, timeout_s: float) -> bool:
        try:
            async with asyncio.timeout(timeout_s), self._calls_changed:
                await self._calls_changed.wait_for(lambda: self._waiting_calls == 0)
            return True
        except TimeoutError:
            return False

    @contextlib.asynccontextmanager
    async def _waiting_call(self) -> AsyncIterator[None]:
        self._waiting_calls += 1
        try:
            yield
        finally:
            self._waiting_calls -= 1
            async with self._calls_changed:
                self._calls_changed.notify_all()
