"""The job queue and result store: submit, run on worker threads, watch, cancel, fetch results.

`JobQueue` is the interface the transport uses; `InProcessJobQueue` keeps everything in this process, and
`redis_jobs.RedisJobQueue` shares jobs between replicas. All public methods
run on the asyncio event loop; the CPU-heavy job body runs in a thread pool.
"""

from __future__ import annotations

import asyncio
import collections
import enum
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

from .errors import JobCancelled, JobNotFinished, JobNotFound, QueueFull, Sam2ServeError, ShuttingDown
from .pipeline import SegmentOutcome, SegmentRequest

log = logging.getLogger(__name__)


class JobState(enum.Enum):
    IN_QUEUE = 1
    IN_PROGRESS = 2
    COMPLETED = 3
    FAILED = 4
    CANCELLED = 5

    @property
    def terminal(self) -> bool:
        return self in (JobState.COMPLETED, JobState.FAILED, JobState.CANCELLED)


class CancelOutcome(enum.Enum):
    CANCELLED_IN_QUEUE = 1
    CANCELLING_IN_PROGRESS = 2
    ALREADY_CANCELLED = 3
    ALREADY_FINISHED = 4


@dataclass
class Job:
    id: str
    request: SegmentRequest
    state: JobState = JobState.IN_QUEUE
    submitted_at: float = field(default_factory=time.time)
    started_at: float | None = None
    finished_at: float | None = None
    progress: float = 0.0
    logs: list[tuple[float, str]] = field(default_factory=list)
    error: BaseException | None = None
    outcome: SegmentOutcome | None = None
    result_bytes: int = 0
    version: int = 0
    cancel_requested: threading.Event = field(default_factory=threading.Event)


@dataclass(frozen=True)
class JobSnapshot:
    """An immutable view of a job for the transport (taken on the event loop)."""

    id: str
    state: JobState
    queue_position: int
    progress: float
    logs: tuple[tuple[float, str], ...]
    error: BaseException | None
    submitted_at: float
    started_at: float | None
    finished_at: float | None
    version: int


Runner = Callable[[SegmentRequest, Callable[[], bool], Callable[[int, int], None], Callable[[str], None]],
                  SegmentOutcome]


class JobQueue(Protocol):
    """What the transport needs of a queue; `InProcessJobQueue` and `redis_jobs.RedisJobQueue` provide it."""

    shared: bool  # other replicas run its jobs too

    async def start(self) -> None: ...
    async def submit(self, request: SegmentRequest) -> JobSnapshot: ...
    async def status(self, job_id: str) -> JobSnapshot: ...
    def watch(self, job_id: str) -> AsyncIterator[JobSnapshot]: ...
    async def request(self, job_id: str) -> SegmentRequest: ...
    async def result(self, job_id: str) -> SegmentOutcome: ...
    async def wait(self, job_id: str) -> JobSnapshot: ...
    async def cancel(self, job_id: str) -> tuple[CancelOutcome, JobSnapshot]: ...
    def depth(self) -> tuple[float, int]:
        """(jobs waiting for this replica, jobs running here); safe to call from any thread."""
        ...
    async def drain(self, timeout_s: float) -> bool: ...
    async def close(self) -> None: ...


class InProcessJobQueue:
    shared = False

    def __init__(self, runner: Runner, workers: int = 1, queue_size: int = 32, result_ttl_s: float = 600.0,
                 result_store_bytes: int = 512 * 1024 * 1024,
                 on_finished: Callable[[Job], None] | None = None) -> None:
        self._runner = runner
        self._queue_size = queue_size
        self._ttl = result_ttl_s
        self._store_bytes = result_store_bytes
        self._on_finished = on_finished
        self._jobs: dict[str, Job] = {}
        self._pending: collections.deque[Job] = collections.deque()
        self._finished: collections.OrderedDict[str, None] = collections.OrderedDict()
        self._changed = asyncio.Condition()
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="sam2serve-job")
        self._loop = asyncio.get_running_loop()
        self._accepting = True
        self._running = 0
        self._workers = [asyncio.create_task(self._work(), name=f"sam2serve-worker-{i}") for i in range(workers)]

    async def start(self) -> None:
        """Nothing to connect to: the workers started with the queue."""

    # -- submitting and reading --------------------------------------------------------------------------
    async def submit(self, request: SegmentRequest) -> JobSnapshot:
        if not self._accepting:
            raise ShuttingDown("the server is shutting down and accepts no new requests")
        if len(self._pending) >= self._queue_size:
            raise QueueFull(f"the queue is full ({self._queue_size} requests waiting); retry later")
        job = Job(id=uuid.uuid4().hex, request=request)
        self._jobs[job.id] = job
        self._pending.append(job)
        await self._notify(job)
        return self._snapshot(job)

    async def status(self, job_id: str) -> JobSnapshot:
        return self._snapshot(self._job(job_id))

    async def request(self, job_id: str) -> SegmentRequest:
        """The request as submitted, without its image once the job has finished."""
        return self._job(job_id).request

    async def result(self, job_id: str) -> SegmentOutcome:
        job = self._job(job_id)
        raise_unless_completed(job_id, job.state, job.error)
        assert job.outcome is not None
        return job.outcome

    async def watch(self, job_id: str) -> AsyncIterator[JobSnapshot]:
        """The current state, then every change, ending with a terminal state."""
        job = self._job(job_id)
        seen = -1
        while True:
            async with self._changed:
                await self._changed.wait_for(lambda seen=seen: job.version != seen)
                snapshot = self._snapshot(job)
            seen = snapshot.version
            yield snapshot
            if snapshot.state.terminal:
                return

    async def wait(self, job_id: str) -> JobSnapshot:
        job = self._job(job_id)
        async with self._changed:
            await self._changed.wait_for(lambda: job.state.terminal)
        return self._snapshot(job)

    async def cancel(self, job_id: str) -> tuple[CancelOutcome, JobSnapshot]:
        job = self._job(job_id)
        if job.state is JobState.CANCELLED:
            return CancelOutcome.ALREADY_CANCELLED, self._snapshot(job)
        if job.state.terminal:
            return CancelOutcome.ALREADY_FINISHED, self._snapshot(job)
        job.cancel_requested.set()
        if job.state is JobState.IN_QUEUE:
            self._pending.remove(job)
            self._finish(job, JobState.CANCELLED)
            return CancelOutcome.CANCELLED_IN_QUEUE, self._snapshot(job)
        self._log(job, "cancellation requested; stopping at the next decoder batch")
        return CancelOutcome.CANCELLING_IN_PROGRESS, self._snapshot(job)

    def depth(self) -> tuple[int, int]:
        """(waiting, running)."""
        return len(self._pending), self._running

    async def drain(self, timeout_s: float) -> bool:
        """Stop accepting; wait until queued and running jobs finish (True) or the timeout passes."""
        self._accepting = False
        try:
            async with asyncio.timeout(timeout_s), self._changed:
                await self._changed.wait_for(lambda: not self._pending and self._running == 0)
            return True
        except TimeoutError:
            return False

    async def close(self) -> None:
        for task in self._workers:
            task.cancel()
        self._executor.shutdown(wait=False, cancel_futures=True)

    # -- internals ---------------------------------------------------------------------------------------
    def _job(self, job_id: str) -> Job:
        self._expire()
        job = self._jobs.get(job_id)
        if job is None:
            raise JobNotFound(f"no request with id {job_id!r} (unknown, or its result expired)")
        return job

    def _snapshot(self, job: Job) -> JobSnapshot:
        position = next((i for i, j in enumerate(self._pending) if j is job), -1)
        return JobSnapshot(job.id, job.state, max(position, 0), job.progress, tuple(job.logs), job.error,
                           job.submitted_at, job.started_at, job.finished_at, job.version)

    async def _notify(self, job: Job | None = None) -> None:
        if job is not None:
            job.version += 1
        async with self._changed:
            self._changed.notify_all()

    def _notify_soon(self, job: Job) -> None:
        self._loop.create_task(self._notify(job))

    def _log(self, job: Job, message: str) -> None:
        job.logs.append((time.time(), message))
        self._notify_soon(job)

    def _finish(self, job: Job, state: JobState, error: BaseException | None = None) -> None:
        job.state, job.error, job.finished_at = state, error, time.time()
        job.request = without_image(job.request)  # the encoded image is no longer needed
        self._finished[job.id] = None
        self._notify_soon(job)
        for others in self._pending:  # queue positions moved
            others.version += 1
        if self._on_finished is not None:
            self._on_finished(job)
        self._expire()

    def _expire(self) -> None:
        now, stored = time.time(), sum(self._jobs[i].result_bytes for i in self._finished)
        for job_id in list(self._finished):
            job = self._jobs[job_id]
            if now - (job.finished_at or now) <= self._ttl and stored <= self._store_bytes:
                break
            stored -= job.result_bytes
            del self._finished[job_id]
            del self._jobs[job_id]

    async def _work(self) -> None:
        while True:
            async with self._changed:
                await self._changed.wait_for(lambda: bool(self._pending))
                job = self._pending.popleft()
            job.state, job.started_at = JobState.IN_PROGRESS, time.time()
            self._running += 1
            for others in self._pending:
                others.version += 1
            await self._notify(job)
            try:
                job.outcome = await self._loop.run_in_executor(self._executor, self._run, job)
                job.result_bytes = _outcome_bytes(job.outcome)
                self._finish(job, JobState.COMPLETED)
            except JobStopped:
                self._finish(job, JobState.CANCELLED)
            except Sam2ServeError as e:
                self._finish(job, JobState.FAILED, e)
            except Exception as e:  # a bug: logged with its traceback, reported as INTERNAL
                log.exception("request %s failed", job.id)
                self._finish(job, JobState.FAILED, e)
            finally:
                self._running -= 1
                await self._notify()

    def _run(self, job: Job) -> SegmentOutcome:
        def should_stop() -> bool:
            return job.cancel_requested.is_set()

        def on_progress(done: int, total: int) -> None:
            job.progress = done / max(total, 1)
            self._loop.call_soon_threadsafe(self._notify_soon, job)

        def log_line(message: str) -> None:
            self._loop.call_soon_threadsafe(self._log, job, message)

        return run_stoppable(self._runner, job.request, should_stop, on_progress, log_line)


class JobStopped(Exception):
    """The runner stopped at a batch boundary because `should_stop` said so."""


def run_stoppable(runner: Runner, request: SegmentRequest, should_stop: Callable[[], bool],
                  on_progress: Callable[[int, int], None], log_line: Callable[[str], None]) -> SegmentOutcome:
    """The runner, with the generator's cancellation turned into `JobStopped` for the queue to handle."""
    from .amg.generator import Cancelled

    try:
        return runner(request, should_stop, on_progress, log_line)
    except Cancelled:
        raise JobStopped from None


def raise_unless_completed(job_id: str, state: JobState, error: BaseException | None) -> None:
    """What asking for the result of a job that has none raises: cancelled, failed, or not finished."""
    if state is JobState.COMPLETED:
        return
    if state is JobState.CANCELLED:
        raise JobCancelled(f"request {job_id} was cancelled")
    if state is JobState.FAILED:
        assert error is not None
        raise error
    raise JobNotFinished(f"request {job_id} is {state.name}; its result is not ready")


def without_image(request: SegmentRequest) -> SegmentRequest:
    from dataclasses import replace

    return replace(request, image_value=b"" if isinstance(request.image_value, bytes) else "")


def _outcome_bytes(outcome: SegmentOutcome) -> int:
    rendered: Any = outcome.rendered
    images = [rendered.combined, *rendered.individual, *([rendered.overlay] if rendered.overlay else [])]
    return sum(len(i.data) for i in images) + sum(len(str(r.rle)) for r in outcome.result.records)

