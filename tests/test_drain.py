"""Draining the in-process queue: results stay fetchable after the last job ends (until fetched, within the
drain budget), and a drain that runs out of time cancels what is left so that clients see CANCELLED."""

from __future__ import annotations

import asyncio
import threading

import pytest

from jobfakes import outcome, request, service
from sam2serve.domain import Cancelled, JobControl, SegmentRequest
from sam2serve.errors import JobCancelled, JobNotFound
from sam2serve.jobs.memory import MemoryJobStore
from sam2serve.jobs.model import JobState


def test_results_stay_fetchable_after_the_drain_until_fetched():
    """Before, the drain ended as soon as the last job did and the process exited: a client that had seen
    COMPLETED got UNAVAILABLE from GetResult."""

    async def main() -> None:
        jobs = service(MemoryJobStore(), lambda r, c: outcome())
        await jobs.start()
        first, second = await jobs.submit(request()), await jobs.submit(request())
        drain = asyncio.create_task(jobs.drain(30, results_grace_s=20))
        for job in (first, second):
            assert (await jobs.wait(job.id)).state is JobState.COMPLETED
        assert (await jobs.result(first.id)).id == first.id
        done, _ = await asyncio.wait({drain}, timeout=0.3)
        assert not done  # the second result has not been fetched: still answering
        assert (await jobs.result(second.id)).id == second.id
        assert await asyncio.wait_for(drain, 5)  # every result fetched: the drain ends, long before its 20 s
        await jobs.close()

    asyncio.run(main())


def test_the_results_grace_ends_with_the_drain_budget():
    async def main() -> None:
        jobs = service(MemoryJobStore(), lambda r, c: outcome())
        await jobs.start()
        job = await jobs.submit(request())
        assert await asyncio.wait_for(jobs.drain(0.5, results_grace_s=60), 5)  # never fetched: 0.5 s, not 60
        assert (await jobs.status(job.id)).state is JobState.COMPLETED
        await jobs.close()

    asyncio.run(main())


def test_an_expiring_drain_cancels_running_and_queued_jobs():
    """Before, the jobs left when the drain period ended were dropped with the process (exit code 1):
    their clients saw the server vanish. Now each ends CANCELLED before the server stops."""
    started, never = threading.Event(), threading.Event()

    def until_stopped(req: SegmentRequest, control: JobControl):
        started.set()
        while not control.should_stop():
            never.wait(0.01)  # a decoder batch
        raise Cancelled()

    async def main() -> None:
        jobs = service(MemoryJobStore(), until_stopped)
        await jobs.start()
        running, queued = await jobs.submit(request()), await jobs.submit(request())
        await asyncio.get_running_loop().run_in_executor(None, started.wait, 10)
        assert not await jobs.drain(0.3, results_grace_s=10)
        for job in (running, queued):
            assert (await jobs.status(job.id)).state is JobState.CANCELLED
            with pytest.raises(JobCancelled, match="was cancelled"):
                await jobs.result(job.id)
        await jobs.close()

    asyncio.run(main())


def test_the_in_process_table_keeps_a_bounded_number_of_finished_jobs():
    """Finding 9: failed jobs were kept for their whole TTL with no count bound (11.5 k of them made GetStatus
    6x slower, as each call summed the kept results). Now the oldest finished jobs go beyond the count, and
    the bytes kept are a running total that stays exact as jobs come and go."""

    async def main() -> None:
        store = MemoryJobStore(result_store_jobs=3, result_store_bytes=10**9)
        ids = []
        for _ in range(5):
            job = await store.add(request())
            claim = await store.claim(1.0)
            await store.finish(claim, JobState.COMPLETED, outcome=outcome())
            ids.append(job.id)
        for gone in ids[:2]:
            with pytest.raises(JobNotFound):
                await store.snapshot(gone)
        for kept in ids[2:]:
            assert (await store.snapshot(kept)).state is JobState.COMPLETED
        assert store._stored_bytes == 3 * outcome().stored_bytes()
        store._store_bytes = 2 * outcome().stored_bytes()  # the byte bound still evicts, oldest first
        await store.add(request())
        assert [await _kept(store, i) for i in ids[2:]] == [False, True, True]

    asyncio.run(main())


async def _kept(store: MemoryJobStore, job_id: str) -> bool:
    try:
        await store.snapshot(job_id)
        return True
    except JobNotFound:
        return False


def test_results_of_jobs_that_ended_just_before_the_drain_stay_fetchable():
    """Before, only jobs unfinished at SIGTERM were waited for: a job that completed a moment earlier, its
    result not yet fetched, was lost with the process."""

    async def main() -> None:
        jobs = service(MemoryJobStore(), lambda r, c: outcome())
        await jobs.start()
        fetched, unfetched = await jobs.submit(request()), await jobs.submit(request())
        for job in (fetched, unfetched):
            assert (await jobs.wait(job.id)).state is JobState.COMPLETED
        await jobs.result(fetched.id)
        drain = asyncio.create_task(jobs.drain(30, results_grace_s=20))
        done, _ = await asyncio.wait({drain}, timeout=0.3)
        assert not done  # `unfetched` ended before the drain, but nobody has its result yet
        assert (await jobs.result(unfetched.id)).id == unfetched.id
        assert await asyncio.wait_for(drain, 5)
        await jobs.close()

    asyncio.run(main())


class _HeldSegmenter:
    """A segmenter whose calls run until `release` is set."""

    def __init__(self) -> None:
        self.started, self.release = threading.Event(), threading.Event()

    def embed(self, source: object) -> str:
        self.started.set()
        self.release.wait(30)
        return "masks"


def test_shutdown_waits_for_prompt_calls_in_flight():
    """Before, the shutdown drained only the job queue and then cut the prompt calls still running."""
    from sam2serve.app import App, RunningServer
    from sam2serve.config import ServerConfig
    from sam2serve.errors import ShuttingDown
    from sam2serve.prompts import ImageSource, PromptWorkers

    async def main() -> None:
        segmenter = _HeldSegmenter()
        prompts = PromptWorkers(segmenter, workers=1)  # type: ignore[arg-type]
        jobs = service(MemoryJobStore(), lambda r, c: outcome())
        await jobs.start()
        config = ServerConfig(drain_seconds=30, metrics_port=-1)
        server = RunningServer(App(config, None, jobs, prompts, None), [])  # type: ignore[arg-type]
        call = asyncio.create_task(prompts.embed(ImageSource("bytes", b"picture")))
        assert await asyncio.get_running_loop().run_in_executor(None, segmenter.started.wait, 10)
        stopping = asyncio.create_task(server.shutdown())
        done, _ = await asyncio.wait({stopping}, timeout=0.3)
        assert not done  # the call is still running
        with pytest.raises(ShuttingDown):
            await prompts.embed(ImageSource("bytes", b"picture"))
        segmenter.release.set()
        assert await asyncio.wait_for(call, 10) == "masks"
        assert await asyncio.wait_for(stopping, 10)

    asyncio.run(main())
