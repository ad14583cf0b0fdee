"""The data plane every protocol adapter (gRPC today) calls: submit, status, watch, result, cancel, and
run-now for callers that wait on their job, over one store and its worker. Nothing here knows a protocol.

Tenants: a request carries the tenant that submitted it; `status`, `watch`, `result` and `cancel` given a
`tenant` (as every adapter gives the caller's) treat a job of another tenant as unknown, with the very error of
an unknown id. Without a `tenant` (this layer's own calls) they see every job."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
from collections.abc import AsyncGenerator, AsyncIterator

from ..admission import admit, admit_webhook
from ..domain import SegmentRequest
from ..errors import Overloaded
from ..limits import AdmissionLimits
from .model import CancelOutcome, JobResult, JobSnapshot, JobState, is_issued_id, not_found, shutting_down
from .store import JobStore
from .worker import Worker

CANCEL_WAIT_S = 5.0  # how long an expired drain waits for running jobs to stop at their next batch
ASKED_KEPT = 10_000  # ids whose outcome was asked for, remembered so that a drain need not wait for them


class JobService:
    def __init__(self, store: JobStore, worker: Worker, limits: AdmissionLimits | None = None,
                 max_streams: int = 0) -> None:
        self.store, self.worker = store, worker
        self.limits = limits or AdmissionLimits()
        self.max_streams = max_streams  # status streams open at once (watch); 0: no bound
        self.streams = 0
        self._accepting = True
        self._stopping = False  # calls cut from here on leave their jobs to the replicas that run them
        self._waiting_calls = 0
        self._unfetched: set[str] = set()  # while draining: jobs whose clients may still ask for the outcome
        self._asked: collections.OrderedDict[str, None] = collections.OrderedDict()  # the latest ASKED_KEPT
        self._fetches_changed = asyncio.Event()
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
        admit(request, self.limits)
        if request.webhook_url:
            await admit_webhook(request.webhook_url, self.limits)
        return await self.store.add(request)

    async def status(self, job_id: str, tenant: str | None = None) -> JobSnapshot:
        snapshot = _owned(await self.store.snapshot(_issued(job_id)), tenant)
        if snapshot.state.terminal and snapshot.state is not JobState.COMPLETED:
            self._fetched(job_id)  # a failure or cancellation is all there is to see
        return snapshot

    def watch(self, job_id: str, tenant: str | None = None) -> AsyncGenerator[JobSnapshot, None]:
        """The current state, then every change, ending with a terminal state; `Overloaded` (on the first
        step) when max_streams are open already."""
        return self._stream(self.store.changes(_issued(job_id)), tenant)

    async def _stream(self, changes: AsyncGenerator[JobSnapshot, None],
                      tenant: str | None) -> AsyncGenerator[JobSnapshot, None]:
        async with contextlib.aclosing(changes):
            if self.max_streams and self.streams >= self.max_streams:
                raise Overloaded(f"{self.max_streams} status streams are open on this server, its bound; "
                                 "retry later or poll GetStatus")
            self.streams += 1
            try:
                async for snapshot in changes:
                    yield _owned(snapshot, tenant)
            finally:
                self.streams -= 1

    async def wait(self, job_id: str) -> JobSnapshot:
        async with contextlib.aclosing(self.store.changes(job_id)) as snapshots:
            async for snapshot in snapshots:
                if snapshot.state.terminal:
                    return snapshot
        raise AssertionError("a job's changes end with a terminal state")

    async def result(self, job_id: str, tenant: str | None = None) -> JobResult:
        if tenant is not None:  # before the result: a failed job's result is its error, which would tell
            _owned(await self.store.snapshot(_issued(job_id)), tenant)
        try:
            return await self.store.result(_issued(job_id))
        finally:
            self._fetched(job_id)

    def _fetched(self, job_id: str) -> None:
        self._asked[job_id] = None
        self._asked.move_to_end(job_id)
        if len(self._asked) > ASKED_KEPT:
            self._asked.popitem(last=False)
        if job_id in self._unfetched:
            self._unfetched.discard(job_id)
            self._fetches_changed.set()

    async def cancel(self, job_id: str, tenant: str | None = None) -> tuple[CancelOutcome, JobSnapshot]:
        if tenant is not None:
            _owned(await self.store.snapshot(_issued(job_id)), tenant)
        return await self.store.cancel(_issued(job_id))

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
    async def drain(self, timeout_s: float, results_grace_s: float = 0.0) -> bool:
        """Refuse new jobs; within `timeout_s`, let the worker finish its jobs (in-process: the queued ones
        too), then let waiting calls whose jobs run elsewhere see them end. True if everything finished.

        Jobs only this process knows of (in-process queue), those unfinished at the start and those that
        ended within `results_grace_s` before it, then stay answerable: for up to `results_grace_s` (within
        `timeout_s`), until the outcome of each was asked for (GetResult, or a GetStatus that saw it fail).
        If time runs out first the unfinished ones are cancelled, so their clients see CANCELLED, not a
        vanished server."""
        self._accepting = False
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        recent = self.store.finished_here_since(time.time() - results_grace_s) if results_grace_s > 0 else []
        self._unfetched = {*self.store.unfinished_here(), *(j for j in recent if j not in self._asked)}
        drained = await self.worker.drain(timeout_s)
        drained = await self._wait_for_waiting_calls(max(0.0, deadline - loop.time())) and drained
        if drained:
            await self._wait_for_fetches(min(results_grace_s, max(0.0, deadline - loop.time())))
        else:
            await self._cancel_unfinished_here()
        self._stopping = self.shared  # in-process jobs stop with the calls that wait on them
        return drained

    async def _wait_for_fetches(self, timeout_s: float) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                while self._unfetched:
                    self._fetches_changed.clear()
                    await self._fetches_changed.wait()

    async def _cancel_unfinished_here(self) -> None:
        """Cancel what the drain left: queued jobs at once, running ones at their next decoder batch (waited
        for up to CANCEL_WAIT_S), so that their callers and watchers see CANCELLED before the server stops."""
        unfinished = self.store.unfinished_here()
        for job_id in unfinished:
            await self.store.cancel(job_id)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(CANCEL_WAIT_S):
                await asyncio.gather(*(self.wait(job_id) for job_id in unfinished))

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


def _owned(snapshot: JobSnapshot, tenant: str | None) -> JobSnapshot:
    """`snapshot`, if its job is `tenant`'s (or `tenant` is None); else NOT_FOUND as for an unknown id."""
    if tenant is not None and snapshot.tenant != tenant:
        raise not_found(snapshot.id)
    return snapshot


def _issued(job_id: str) -> str:
    """`job_id`, if it has the form of an id a store issues; else NOT_FOUND without a lookup."""
    if not is_issued_id(job_id):
        raise not_found(job_id)
    return job_id
