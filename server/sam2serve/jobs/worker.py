"""The one worker loop over any `JobStore`: claim a job, run its stages in a thread, finish it; drain and
close. What a run may write goes through its claim, so the store can refuse a claim that lost its job."""

from __future__ import annotations

import asyncio
import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol, TypeVar

from ..domain import Cancelled, JobControl, SegmentOutcome, SegmentRequest
from ..errors import QueueUnavailable, Sam2ServeError
from .model import JobState
from .store import Claim, JobStore

log = logging.getLogger(__name__)

CLAIM_WAIT_S = 1.0  # a worker's wait for a job between looks at the drain flag
RETRY_AFTER_S = 5.0  # a worker's pause after its store was unreachable
Fetched = TypeVar("Fetched")


class Runner(Protocol[Fetched]):
    """The work of a job in two stages, each run in a worker thread: `fetch` its input (network, parsing),
    then `compute` its outcome (the engines). Both may raise domain errors; `compute` raises `Cancelled`
    when `control.should_stop()` said so."""

    def fetch(self, request: SegmentRequest, control: JobControl) -> Fetched: ...

    def compute(self, request: SegmentRequest, fetched: Fetched, control: JobControl) -> SegmentOutcome: ...


class _ClaimControl:
    """The `JobControl` of one claimed run: stop when the store says the claim lost its job (or it was
    cancelled) or the worker is closing; progress and logs only through the claim."""

    def __init__(self, store: JobStore, claim: Claim, closing: threading.Event) -> None:
        self._store, self._claim, self._closing = store, claim, closing

    def should_stop(self) -> bool:
        return self._closing.is_set() or self._store.stop_requested(self._claim)

    def progress(self, done: int, total: int) -> None:
        if not self._closing.is_set():
            self._store.report_progress(self._claim, done / max(total, 1))

    def log(self, message: str) -> None:
        if not self._closing.is_set():
            self._store.add_log(self._claim, message)


class Worker:
    def __init__(self, store: JobStore, runner: Runner[Any], workers: int = 1) -> None:
        self._store, self._runner, self._workers = store, runner, workers
        # workers=0: a replica that accepts and answers but runs nothing (the others do)
        self._executor = ThreadPoolExecutor(max_workers=max(workers, 1), thread_name_prefix="sam2serve-job")
        self._draining = False
        self._closing = threading.Event()  # running jobs stop at their next batch; shared stores hand them back
        self._running = 0  # read by metrics scrapes on another thread
        self._tasks: list[asyncio.Task[None]] = []

    @property
    def running(self) -> int:
        return self._running

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._work(), name=f"sam2serve-worker-{i}") for i in range(self._workers)]

    async def drain(self, timeout_s: float) -> bool:
        """Take no new jobs, except that a store nobody else serves is worked off first; wait until running
        jobs finish (True) or the timeout passes. Queued jobs of a shared store stay for the other replicas."""
        self._draining = True
        if not self._tasks:
            return True
        _, pending = await asyncio.wait(self._tasks, timeout=timeout_s)
        return not pending

    async def close(self) -> None:
        """Stop: running jobs stop at their next batch without being finished here (a shared store hands
        them back when it closes)."""
        self._draining = True
        self._closing.set()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def _work(self) -> None:
        while not (self._draining and self._store.shared):
            try:
                claim = await self._store.claim(0 if self._draining else CLAIM_WAIT_S)
                if claim is None:
                    if self._draining:
                        return  # the queue is empty
                    continue
                self._running += 1
                try:
                    if self._draining and self._store.shared:  # drain began while waiting: leave it to others
                        await self._store.hand_back(claim)
                        return
                    await self._run(claim)
                finally:
                    self._running -= 1
                    self._store.release(claim)
            except asyncio.CancelledError:
                raise
            except QueueUnavailable as e:  # the job stays held; the store hands it back when it recovers
                log.warning("job queue: store unreachable in a worker (%s); retrying", e)
                await asyncio.sleep(RETRY_AFTER_S)  # back off; the store reconnects
            except Exception:
                log.exception("job queue: worker error; continuing")

    async def _run(self, claim: Claim) -> None:
        control = _ClaimControl(self._store, claim, self._closing)
        loop = asyncio.get_running_loop()
        outcome: SegmentOutcome | None = None
        error: BaseException | None = None
        try:
            fetched = await loop.run_in_executor(self._executor, self._runner.fetch, claim.request, control)
            outcome = await loop.run_in_executor(self._executor, self._runner.compute, claim.request, fetched,
                                                 control)
            state = JobState.COMPLETED
        except Cancelled:
            if self._closing.is_set():  # a closing worker leaves the job held (a shared store hands it back)
                return
            state = JobState.CANCELLED  # cancelled, or taken over (then the store refuses the finish)
        except QueueUnavailable:
            raise  # the store is unreachable: the job stays held until the store hands it back
        except Sam2ServeError as e:
            state, error = JobState.FAILED, e
        except Exception as e:  # a bug: logged with its traceback, reported as INTERNAL
            log.exception("request %s failed", claim.job_id)
            state, error = JobState.FAILED, e
        if not await self._store.finish(claim, state, outcome=outcome, error=error):
            log.warning("job queue: %s was taken over by another claim; its %s here is dropped", claim.job_id,
                        state.name)
