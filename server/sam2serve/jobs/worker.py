"""The one worker loop over any `JobStore`: claim a job, run its stages in a thread, finish it; drain and
close. What a run may write goes through its claim, so the store can refuse a claim that lost its job."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import threading
import time
from collections.abc import AsyncIterator, Callable
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
T = TypeVar("T")


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

    @contextlib.asynccontextmanager
    async def clock_stopped(self) -> AsyncIterator[None]:
        """The time limit counts the job's own work, not its wait for a free compute worker."""
        start = time.monotonic()
        try:
            yield
        finally:
            self._deadline += time.monotonic() - start

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
        # The fetch stage: jobs whose image is a URL are claimed by its own loop, only when it has room, and
        # fetched on its own threads, so that a slow or hanging upstream holds a fetch slot (at most `fetchers`
        # jobs), never a compute worker: the workers claim only jobs whose image came with the request.
        self._fetchers = fetchers
        self._fetch_executor = ThreadPoolExecutor(max_workers=max(fetchers, 1), thread_name_prefix="sam2serve-fetch")
        self._fetch_room = asyncio.Semaphore(max(fetchers, 1))  # URL jobs claimed and not yet computing
        self._compute = asyncio.Semaphore(max(workers, 1))
        self._fetching: set[asyncio.Task[None]] = set()
        self._draining = False
        self._drain_begun = asyncio.Event()  # wakes the loops waiting for a job, so that a drain ends at once
        self._closing = threading.Event()  # running jobs stop at their next batch; shared stores hand them back
        self._running = 0  # read by metrics scrapes on another thread
        self._tasks: list[asyncio.Task[None]] = []

    @property
    def running(self) -> int:
        return self._running

    def start(self) -> None:
        apart = self._fetchers > 0
        self._tasks = [asyncio.create_task(self._work(url=False if apart else None), name=f"sam2serve-worker-{i}")
                       for i in range(self._workers)]
        if apart and self._workers > 0:
            self._tasks.append(asyncio.create_task(self._dispatch_fetches(), name="sam2serve-fetch-stage"))

    async def drain(self, timeout_s: float) -> bool:
        """Take no new jobs, except that a store nobody else serves is worked off first; wait until running
        jobs finish (True) or the timeout passes. Queued jobs of a shared store stay for the other replicas."""
        self._draining = True
        self._drain_begun.set()
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

    async def _work(self, url: bool | None) -> None:
        """A compute worker: claim a job (`url` None: any; False: only those whose image came with the
        request) and run it. It never waits on a download: URL jobs are the fetch stage's."""
        while not (self._draining and self._store.shared):
            try:
                claim = await self._next_claim(url)
                if claim is None:
                    if self._draining:
                        return  # the queue is empty
                    continue
                self._running += 1
                if await self._handed_back_while_draining(claim):
                    return
                await self._run(claim, fetch_apart=False)
            except asyncio.CancelledError:
                raise
            except QueueUnavailable as e:  # the job stays held; the store hands it back when it recovers
                log.warning("job queue: store unreachable in a worker (%s); retrying", e)
                await asyncio.sleep(RETRY_AFTER_S)  # back off; the store reconnects
            except Exception:
                log.exception("job queue: worker error; continuing")

    async def _dispatch_fetches(self) -> None:
        """The fetch stage's one claimer: while fewer than `fetchers` URL jobs are fetched and not yet
        computing, claim the next URL job (in queue order) and fetch it apart; else claim nothing, so that the
        waiting URL jobs stay queued (cancellable, and free for other replicas) and take no worker."""
        while not (self._draining and self._store.shared):
            await self._fetch_room.acquire()  # held until the claimed job starts computing (or ends)
            handed_off = False
            try:
                claim = await self._next_claim(url=True)
                if claim is None:
                    if self._draining:
                        return
                    continue
                self._running += 1
                if await self._handed_back_while_draining(claim):
                    return
                task = asyncio.create_task(self._logged(self._run(claim, fetch_apart=True)))
                handed_off = True
                self._fetching.add(task)
                task.add_done_callback(self._fetching.discard)
            except asyncio.CancelledError:
                raise
            except QueueUnavailable as e:
                log.warning("job queue: store unreachable in the fetch stage (%s); retrying", e)
                await asyncio.sleep(RETRY_AFTER_S)
            except Exception:
                log.exception("job queue: fetch stage error; continuing")
            finally:
                if not handed_off:
                    self._fetch_room.release()

    async def _next_claim(self, url: bool | None) -> Claim | None:
        """The next job of the kind, waiting up to CLAIM_WAIT_S, or less if a drain begins meanwhile (then
        the loop looks once more without waiting)."""
        if self._draining:
            return await self._store.claim(0, url=url)
        claiming = asyncio.create_task(self._store.claim(CLAIM_WAIT_S, url=url))
        drain = asyncio.create_task(self._drain_begun.wait())
        try:
            await asyncio.wait({claiming, drain}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            drain.cancel()
            if not claiming.done():
                claiming.cancel()
            # a claim made just as it was cancelled is still this loop's job
            outcome = (await asyncio.gather(claiming, return_exceptions=True))[0]
        if isinstance(outcome, BaseException) and not isinstance(outcome, asyncio.CancelledError):
            raise outcome
        if isinstance(outcome, Claim):
            return outcome
        return await self._store.claim(0, url=url) if self._draining else None

    async def _handed_back_while_draining(self, claim: Claim) -> bool:
        """Drain began while waiting for a shared store's job: leave it to the other replicas."""
        if not (self._draining and self._store.shared):
            return False
        try:
            await self._store.hand_back(claim)
        finally:
            self._finished_with(claim)
        return True

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

    async def fetch(self, download: Callable[[], T]) -> T:
        """Run `download` in the fetch stage, beside the URL jobs: within its room (waiting for a slot), on
        its threads; the slot frees when the thread ends, even if the caller left before."""
        loop = asyncio.get_running_loop()
        await self._fetch_room.acquire()
        try:
            running = self._fetch_executor.submit(download)
        except BaseException:
            self._fetch_room.release()
            raise
        running.add_done_callback(lambda _: loop.call_soon_threadsafe(self._fetch_room.release))
        return await asyncio.wrap_future(running)

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
                    async with control.clock_stopped():
                        await self._compute.acquire()
                finally:
                    self._fetch_room.release()
                try:
                    outcome = await loop.run_in_executor(self._executor, self._runner.compute, claim.request,
                                                         fetched, control)
                finally:
                    self._compute.release()
            else:
                async with control.clock_stopped():
                    await self._compute.acquire()
                async with _releasing(self._compute):
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


@contextlib.asynccontextmanager
async def _releasing(semaphore: asyncio.Semaphore) -> AsyncIterator[None]:
    try:
        yield
    finally:
        semaphore.release()
