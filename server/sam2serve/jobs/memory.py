"""Jobs kept in this process: a deque of waiting jobs and a table of all of them, changed only on the event
loop (job threads hop onto it), finished jobs kept for `result_ttl_s` within a byte budget."""

from __future__ import annotations

import asyncio
import collections
import time
import uuid
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field

from ..domain import SegmentOutcome, SegmentRequest
from .model import (
    CANCELLING_MESSAGE,
    CancelOutcome,
    JobFinished,
    JobResult,
    JobSnapshot,
    JobState,
    check_transition,
    error_from,
    image_size,
    new_id,
    not_found,
    queue_bytes_full,
    queue_full,
    raise_unless_completed,
    stored_error,
)
from .store import Claim, FinishedListener


@dataclass
class _Job:
    id: str
    request: SegmentRequest
    state: JobState = JobState.IN_QUEUE
    submitted_at: float = field(default_factory=time.time)
    started_at: float | None = None
    finished_at: float | None = None
    progress: float = 0.0
    logs: list[tuple[float, str]] = field(default_factory=list)
    error: tuple[str, str] | None = None  # model.stored_error
    outcome: SegmentOutcome | None = None
    result_bytes: int = 0
    version: int = 0
    claim: str = ""  # token of the claim that holds it
    cancel_requested: bool = False


class MemoryJobStore:
    shared = False
    reachable = True  # it is this process

    def __init__(self, queue_size: int = 32, result_ttl_s: float = 600.0,
                 result_store_bytes: int = 512 * 1024 * 1024, on_finished: FinishedListener | None = None,
                 queue_bytes: int = 0, result_store_jobs: int = 10_000) -> None:
        self._queue_size, self._ttl, self._store_bytes = queue_size, result_ttl_s, result_store_bytes
        self._store_jobs = result_store_jobs  # finished jobs kept; the oldest go first
        self._stored_bytes = 0  # the results of the finished jobs kept, summed as they come and go
        self._queue_bytes = queue_bytes  # images held by waiting jobs; 0: no budget
        self._on_finished = on_finished
        self._jobs: dict[str, _Job] = {}
        self._pending: collections.deque[_Job] = collections.deque()
        self._finished: collections.OrderedDict[str, None] = collections.OrderedDict()
        self._changed = asyncio.Event()  # set and replaced at every change: waiters take it before looking
        self._loop = asyncio.get_running_loop()

    async def start(self) -> None:
        """Nothing to connect to."""

    async def close(self) -> None:
        """Jobs kept here end with the process."""

    async def reachability_changed(self) -> bool:
        """Never: this process's own store is always there."""
        await asyncio.Future()
        return True

    # -- callers -----------------------------------------------------------------------------------------------
    async def add(self, request: SegmentRequest) -> JobSnapshot:
        if len(self._pending) >= self._queue_size:
            raise queue_full(self._queue_size)
        if self._queue_bytes:
            held, size = sum(image_size(j.request) for j in self._pending), image_size(request)
            if held + size > self._queue_bytes:
                raise queue_bytes_full(held, size, self._queue_bytes)
        job = _Job(id=new_id(), request=request)
        self._jobs[job.id] = job
        self._pending.append(job)
        self._touch(job)
        return self._snapshot(job)

    async def snapshot(self, job_id: str) -> JobSnapshot:
        return self._snapshot(self._job(job_id))

    async def changes(self, job_id: str) -> AsyncGenerator[JobSnapshot, None]:
        job, seen = self._job(job_id), -1
        while True:
            changed = self._changed
            if job.version == seen:
                await changed.wait()
                continue
            snapshot = self._snapshot(job)
            seen = snapshot.version
            yield snapshot
            if snapshot.state.terminal:
                return

    async def result(self, job_id: str) -> JobResult:
        job = self._job(job_id)
        raise_unless_completed(job_id, job.state, self._error(job))
        assert job.outcome is not None
        return JobResult(job.id, job.outcome, job.request, (job.started_at or job.submitted_at) - job.submitted_at)

    async def cancel(self, job_id: str) -> tuple[CancelOutcome, JobSnapshot]:
        job = self._job(job_id)
        if job.state is JobState.CANCELLED:
            return CancelOutcome.ALREADY_CANCELLED, self._snapshot(job)
        if job.state.terminal:
            return CancelOutcome.ALREADY_FINISHED, self._snapshot(job)
        job.cancel_requested = True
        if job.state is JobState.IN_QUEUE:
            self._pending.remove(job)
            self._end(job, JobState.CANCELLED)
            return CancelOutcome.CANCELLED_IN_QUEUE, self._snapshot(job)
        self._log(job, CANCELLING_MESSAGE)
        return CancelOutcome.CANCELLING_IN_PROGRESS, self._snapshot(job)

    def waiting(self) -> float:
        return len(self._pending)

    def unfinished_here(self) -> list[str]:
        return [job.id for job in self._jobs.values() if not job.state.terminal]

    def finished_here_since(self, since: float) -> list[str]:
        recent = []
        for job_id in reversed(self._finished):  # in the order they ended
            if (self._jobs[job_id].finished_at or 0.0) < since:
                break
            recent.append(job_id)
        return recent

    # -- workers -----------------------------------------------------------------------------------------------
    async def claim(self, timeout_s: float, url: bool | None = None) -> Claim | None:
        try:
            async with asyncio.timeout(max(timeout_s, 0)):
                while (job := self._next(url)) is None:
                    await self._changed.wait()
        except TimeoutError:
            return None
        self._pending.remove(job)
        check_transition(job.id, job.state, JobState.IN_PROGRESS)
        job.state, job.started_at, job.progress = JobState.IN_PROGRESS, time.time(), 0.0
        job.claim = uuid.uuid4().hex
        self._touch(job, *self._pending)  # queue positions moved
        return Claim(job.id, job.claim, job.request)

    async def finish(self, claim: Claim, state: JobState, outcome: SegmentOutcome | None = None,
                     error: BaseException | None = None) -> bool:
        job = self._held(claim)
        if job is None:
            return False
        self._end(job, state, outcome, error)
        return True

    async def hand_back(self, claim: Claim) -> None:
        job = self._held(claim)
        if job is not None:
            check_transition(job.id, job.state, JobState.IN_QUEUE)
            job.state, job.progress, job.claim = JobState.IN_QUEUE, 0.0, ""
            self._pending.appendleft(job)
            self._touch(*self._pending)

    def release(self, claim: Claim) -> None:
        """Nothing outlives this process's workers here."""

    def stop_requested(self, claim: Claim) -> bool:
        job = self._jobs.get(claim.job_id)
        return job is None or job.cancel_requested or job.claim != claim.token

    def report_progress(self, claim: Claim, fraction: float) -> None:
        self._loop.call_soon_threadsafe(self._progress_if_held, claim, fraction)

    def add_log(self, claim: Claim, message: str) -> None:
        self._loop.call_soon_threadsafe(self._log_if_held, claim, message)

    # -- internals (event loop) --------------------------------------------------------------------------------
    def _next(self, url: bool | None) -> _Job | None:
        return next((job for job in self._pending if url is None or (job.request.image_kind == "url") == url), None)

    def _held(self, claim: Claim) -> _Job | None:
        job = self._jobs.get(claim.job_id)
        return job if job is not None and job.state is JobState.IN_PROGRESS and job.claim == claim.token else None

    def _progress_if_held(self, claim: Claim, fraction: float) -> None:
        if (job := self._held(claim)) is not None:
            job.progress = fraction
            self._touch(job)

    def _log_if_held(self, claim: Claim, message: str) -> None:
        if (job := self._held(claim)) is not None:
            self._log(job, message)

    def _log(self, job: _Job, message: str) -> None:
        job.logs.append((time.time(), message))
        self._touch(job)

    def _touch(self, *jobs: _Job) -> None:
        for job in jobs:
            job.version += 1
        self._changed.set()
        self._changed = asyncio.Event()

    def _job(self, job_id: str) -> _Job:
        self._expire()
        job = self._jobs.get(job_id)
        if job is None:
            raise not_found(job_id)
        return job

    @staticmethod
    def _error(job: _Job) -> BaseException | None:
        return error_from(*job.error) if job.error is not None else None

    def _snapshot(self, job: _Job) -> JobSnapshot:
        position = next((i for i, j in enumerate(self._pending) if j is job), 0)
        return JobSnapshot(job.id, job.state, position, job.progress, tuple(job.logs), self._error(job),
                           job.submitted_at, job.started_at, job.finished_at, job.version, job.request.tenant)

    def _end(self, job: _Job, state: JobState, outcome: SegmentOutcome | None = None,
             error: BaseException | None = None) -> None:
        check_transition(job.id, job.state, state)
        job.state, job.finished_at, job.claim = state, time.time(), ""
        job.error = stored_error(error) if error is not None else None
        job.outcome, job.result_bytes = outcome, outcome.stored_bytes() if outcome is not None else 0
        job.request = job.request.without_image()
        self._finished[job.id] = None
        self._stored_bytes += job.result_bytes
        self._touch(job, *self._pending)  # queue positions moved
        if self._on_finished is not None:
            self._on_finished(JobFinished(job.id, state, job.request, job.submitted_at, job.started_at,
                                          job.finished_at, self._error(job), outcome))
        self._expire()

    def _expire(self) -> None:
        """Forget the oldest finished jobs while one is past its TTL or the kept ones pass the byte or count
        bound; O(jobs forgotten), so no call pays for the table's size."""
        now = time.time()
        while self._finished:
            job = self._jobs[next(iter(self._finished))]
            if (now - (job.finished_at or now) <= self._ttl and self._stored_bytes <= self._store_bytes
                    and len(self._finished) <= self._store_jobs):
                break
            self._stored_bytes -= job.result_bytes
            del self._finished[job.id]
            del self._jobs[job.id]
