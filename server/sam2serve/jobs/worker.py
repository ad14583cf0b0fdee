"""The one worker loop over any `JobStore`: claim a job, run its stages in a thread, finish it; drain and
close. What a run may write goes through its claim, so the store can refuse a claim that lost its job."""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol, TypeVar

from ..domain import Cancelled, JobControl, SegmentOutcome, SegmentRequest
from ..errors import JobTimedOut, QueueUnavailable, Sam2ServeError
from .model import JobState
from .store import Claim, JobStore

log = logging.getLogger(__name__)

CLAIM_WAIT_S = 1.0  # a worker's wait for a job between looks at the drain flag
FETCH_POLL_S = 0.25  # how often a job in the fetch stage looks whether it should stop
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
    cancelled), the worker is closing, or the run passed its time limit; progress and logs only through the
    claim."""

    def __init__(self, store: JobStore, claim: Claim, closing: threading.Event, time_limit_s: float) -> None:
        self._store, self._claim, self._closing = store, claim, closing
        self._deadline = time.monotonic() + time_limit_s if time_limit_s > 0 else math.inf
        self.timed_out = False

    def should_stop(self) -> bool:
        if time.monotonic() > self._deadline:
            self.timed_out = True
            return True
        return self._closing.is_set() or self._store.stop_requested(self._claim)

    def progress(self, done: int, total: int) -> None:
        if not self._closing.is_set():
            self._store.report_progress(self._claim, done / max(total, 1))

    def log(self, message: str) -> None:
        if not self._closing.is_set():
            self._store.add_log(self._claim, message)


class Worker:
    def __init__(self, store: JobStore, runner: Runner[Any], workers: int = 1, time_limit_s: float = 0.0,
                 fetchers: int = 4) -> None:
        self._store, self._runner, self._workers = store, runner, workers
        self._time_limit_s = time_limit_s  # per run of a job; 0: none
        # workers=0: a replica that accepts and answers but runs nothing (the others do)
        self._executor = ThreadPoolExecutor(max_workers=max(workers, 1), thread_name_prefix="sam2serve-job")
        # The fetch stage: jobs whose image is a URL are fetched here, on their own threads, so that a slow or
        # hanging upstream holds a fetch slot (at most `fetchers` jobs), never one of the `workers` compute slots.
        self._fetchers = fetchers
        self._fetch_executor = ThreadPoolExecutor(max_workers=max(fetchers, 1), thread_name_prefix="sam2serve-fetch")
        self._fetch_room = asyncio.Semaphore(max(fetchers, 1))  # URL jobs claimed and not yet computing
        self._compute = asyncio.Semaphore(max(workers, 1))
        self._fetching: set[asyncio.Task[None]] = set()
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
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        _, pending = await asyncio.wait(self._tasks, timeout=timeout_s)
        if self._fetching:  # jobs the loops handed to the fetch stage
            _, still = await asyncio.wait(set(self._fetching), timeout=max(0.0, deadline - loop.time()))
            pending |= still
        return not pending

    async def close(self) -> None:
        """Stop: running jobs stop at their next batch without being finished here (a shared store hands
        them back when it closes)."""
        self._draining = True
        self._closing.set()
        tasks = [*self._tasks, *self._fetching]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._executor.shutdown(wait=False, cancel_futures=True)
        self._fetch_executor.shutdown(wait=False, cancel_futures=True)

    async def _work(self) -> None:
        while not (self._draining and self._store.shared):
            try:
                claim = await self._store.claim(0 if self._draining else CLAIM_WAIT_S)
                if claim is None:
                    if self._draining:
                        return  # the queue is empty
                    continue
                self._running += 1
                if self._draining and self._store.shared:  # drain began while waiting: leave it to others
                    try:
                        await self._store.hand_back(claim)
                    finally:
                        self._finished_with(claim)
                    return
                if self._fetchers > 0 and claim.request.image_kind == "url":
                    try:  # when `fetchers` URL jobs are fetching already, this one waits for one of them
                        await self._fetch_room.acquire()  # held until the job starts computing
                    except BaseException:
                        self._finished_with(claim)
                        raise
                    task = asyncio.create_task(self._logged(self._run(claim, fetch_apart=True)))
                    self._fetching.add(task)
                    task.add_done_callback(self._fetching.discard)
                    continue
                await self._run(claim, fetch_apart=False)
            except asyncio.CancelledError:
                raise
            except QueueUnavailable as e:  # the job stays held; the store hands it back when it recovers
                log.warning("job queue: store unreachable in a worker (%s); retrying", e)
                await asyncio.sleep(RETRY_AFTER_S)  # back off; the store reconnects
            except Exception:
                log.exception("job queue: worker error; continuing")

    def _finished_with(self, claim: Claim) -> None:
        self._running -= 1
        self._store.release(claim)

    @staticmethod
    async def _logged(run: Any) -> None:
        try:
            await run
        except QueueUnavailable as e:  # the job stays held; the store hands it back when it recovers
            log.warning("job queue: store unreachable while finishing a job (%s)", e)
        except Exception:
            log.exception("job queue: worker error; continuing")

    async def _fetched_apart(self, claim: Claim, control: _ClaimControl) -> Any:
        """The fetch stage of a URL job, on the fetch threads; Cancelled as soon as the job should stop (the
        thread is left to end by the fetch's own timeouts, still counted in the stage's room)."""
        loop = asyncio.get_running_loop()
        fetch = loop.run_in_executor(self._fetch_executor, self._runner.fetch, claim.request, control)
        try:
            while True:
                done, _ = await asyncio.wait({fetch}, timeout=FETCH_POLL_S)
                if done:
                    return fetch.result()
                if await loop.run_in_executor(None, control.should_stop):
                    raise Cancelled()
        except BaseException:
            fetch.add_done_callback(lambda _: self._fetch_room.release())  # the slot frees when the thread does
            raise

    async def _run(self, claim: Claim, fetch_apart: bool) -> None:
        try:
            await self._run_stages(claim, fetch_apart)
        finally:
            self._finished_with(claim)

    async def _run_stages(self, claim: Claim, fetch_apart: bool) -> None:
        control = _ClaimControl(self._store, claim, self._closing, self._time_limit_s)
        loop = asyncio.get_running_loop()
        outcome: SegmentOutcome | None = None
        error: BaseException | None = None
        try:
            if fetch_apart:
                fetched = await self._fetched_apart(claim, control)
                try:
                    await self._compute.acquire()
                finally:
                    self._fetch_room.release()
                try:
                    outcome = await loop.run_in_executor(self._executor, self._runner.compute, claim.request,
                                                         fetched, control)
                finally:
                    self._compute.release()
            else:
                async with self._compute:
                    fetched = await loop.run_in_executor(self._executor, self._runner.fetch, claim.request, control)
                    outcome = await loop.run_in_executor(self._executor, self._runner.compute, claim.request,
                                                         fetched, control)
            state = JobState.COMPLETED
        except Cancelled:
            if self._closing.is_set():  # a closing worker leaves the job held (a shared store hands it back)
                return
            if control.timed_out:
                state, error = JobState.FAILED, JobTimedOut(
                    f"the job ran past this server's time limit of {self._time_limit_s:g} s per job and was "
                    "stopped; ask for less work (points_per_side, crop_n_layers, use_m2m)")
            else:
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
