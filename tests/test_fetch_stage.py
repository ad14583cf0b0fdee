"""image_url downloads run in their own bounded stage: a hanging URL holds a fetch slot, never the compute
worker, and a job in that stage stops (cancel, time limit) without waiting for its download."""

from __future__ import annotations

import asyncio
import threading

from jobfakes import outcome, request, url_request
from sam2serve.domain import Cancelled, JobControl, SegmentOutcome, SegmentRequest
from sam2serve.errors import JobTimedOut
from sam2serve.jobs import JobService, Worker
from sam2serve.jobs.memory import MemoryJobStore
from sam2serve.jobs.model import JobState

HANG_S = 30.0  # what a test's hanging download waits at most (it is released before)


class HangingUrls:
    """A runner whose URL fetches hang until `release` is set; other images are fetched at once."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.fetching = threading.Event()
        self.computed: list[str] = []

    def fetch(self, request: SegmentRequest, control: JobControl) -> str:
        if request.image_kind == "url":
            self.fetching.set()
            self.release.wait(HANG_S)
        return request.image_kind

    def compute(self, request: SegmentRequest, fetched: str, control: JobControl) -> SegmentOutcome:
        self.computed.append(fetched)
        return outcome()


async def started(runner: HangingUrls) -> None:
    await asyncio.get_running_loop().run_in_executor(None, runner.fetching.wait, HANG_S)
    assert runner.fetching.is_set()


def run(body, *, fetchers: int = 2, time_limit_s: float = 0.0) -> None:
    async def main() -> None:
        runner = HangingUrls()
        store = MemoryJobStore()
        jobs = JobService(store, Worker(store, runner, workers=1, time_limit_s=time_limit_s, fetchers=fetchers))
        await jobs.start()
        try:
            await body(jobs, runner)
        finally:
            runner.release.set()
            await jobs.close()

    asyncio.run(main())


def test_a_hanging_url_does_not_hold_the_worker():
    """Before, the download ran on the compute worker: a request behind a hanging URL waited 20.8 s."""

    async def body(jobs: JobService, runner: HangingUrls) -> None:
        slow = await jobs.submit(url_request())
        await started(runner)
        behind = await jobs.submit(request())
        done = await asyncio.wait_for(jobs.wait(behind.id), 10)
        assert done.state is JobState.COMPLETED and runner.computed == ["bytes"]
        assert (await jobs.status(slow.id)).state is JobState.IN_PROGRESS  # still downloading
        runner.release.set()
        assert (await asyncio.wait_for(jobs.wait(slow.id), 10)).state is JobState.COMPLETED
        assert runner.computed == ["bytes", "url"]

    run(body)


def test_a_job_in_the_fetch_stage_is_cancelled_without_waiting_for_its_download():
    async def body(jobs: JobService, runner: HangingUrls) -> None:
        slow = await jobs.submit(url_request())
        await started(runner)
        await jobs.cancel(slow.id)
        assert (await asyncio.wait_for(jobs.wait(slow.id), 5)).state is JobState.CANCELLED
        assert not runner.release.is_set() and runner.computed == []

    run(body)


def test_the_time_limit_covers_the_fetch_stage():
    async def body(jobs: JobService, runner: HangingUrls) -> None:
        slow = await jobs.submit(url_request())
        failed = await asyncio.wait_for(jobs.wait(slow.id), 10)
        assert failed.state is JobState.FAILED and isinstance(failed.error, JobTimedOut)
        assert not runner.release.is_set()

    run(body, time_limit_s=0.5)


def test_a_full_fetch_stage_leaves_url_jobs_queued_and_runs_the_others():
    """With the one fetch slot taken by a hanging URL, the next URL job stays queued (not claimed) and a job
    behind it whose image came with the request runs. Before, a worker claimed the URL job and waited for
    fetch room, so the job behind it waited too."""

    async def body(jobs: JobService, runner: HangingUrls) -> None:
        first = await jobs.submit(url_request())
        await started(runner)
        runner.fetching.clear()
        second = await jobs.submit(url_request())
        third = await jobs.submit(request())
        assert (await asyncio.wait_for(jobs.wait(third.id), 10)).state is JobState.COMPLETED
        assert not runner.fetching.is_set() and runner.computed == ["bytes"]
        assert (await jobs.status(second.id)).state is JobState.IN_QUEUE  # waits for the stage, unclaimed
        assert (await jobs.status(first.id)).state is JobState.IN_PROGRESS
        runner.release.set()
        for job in (first, second):
            assert (await asyncio.wait_for(jobs.wait(job.id), 10)).state is JobState.COMPLETED
        assert runner.computed == ["bytes", "url", "url"]

    run(body, fetchers=1)


class BusyWorker:
    """A runner whose first job holds the one compute worker until `release`; the time limit is checked
    in every later job's compute, as the generator checks it at each decoder batch."""

    def __init__(self) -> None:
        self.release, self.busy, self.fetched = threading.Event(), threading.Event(), threading.Event()

    def fetch(self, request: SegmentRequest, control: JobControl) -> str:
        if request.image_kind == "url":
            self.fetched.set()
        return request.image_kind

    def compute(self, request: SegmentRequest, fetched: str, control: JobControl) -> SegmentOutcome:
        if fetched == "bytes":
            self.busy.set()
            self.release.wait(HANG_S)
        elif control.should_stop():
            raise Cancelled()
        return outcome()


def test_the_time_limit_does_not_count_the_wait_for_a_compute_worker():
    """A URL job fetched at once, then waiting longer than the limit for the busy worker, still runs: the
    limit is the job's own run time (fetch and compute). Before, its clock ran from the claim."""

    async def main() -> None:
        runner, store = BusyWorker(), MemoryJobStore()
        jobs = JobService(store, Worker(store, runner, workers=1, time_limit_s=0.5, fetchers=1))
        await jobs.start()
        loop = asyncio.get_running_loop()
        try:
            busy = await jobs.submit(request())
            assert await loop.run_in_executor(None, runner.busy.wait, HANG_S)
            waiting = await jobs.submit(url_request())
            assert await loop.run_in_executor(None, runner.fetched.wait, HANG_S)
            await asyncio.sleep(1.0)  # time passing is what is tested: twice the limit, waiting for compute
            runner.release.set()
            assert (await asyncio.wait_for(jobs.wait(busy.id), 10)).state is JobState.COMPLETED
            assert (await asyncio.wait_for(jobs.wait(waiting.id), 10)).state is JobState.COMPLETED
        finally:
            runner.release.set()
            await jobs.close()

    asyncio.run(main())
