"""One contract for every job store, run against the in-process store and the Redis store (a real
redis-server): every state change of `model.TRANSITIONS`, fencing of a stale claim's progress, logs and
finish, cancel in the queue and in progress, the events listeners get, drain, expiry, and the worker over
each store with a fake runner."""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
import uuid
from collections.abc import Awaitable, Callable

import pytest

from conftest import needs_redis
from jobfakes import outcome, request, service
from sam2serve.errors import (
    InvalidInput,
    JobCancelled,
    JobNotFinished,
    JobNotFound,
    JobTimedOut,
    QueueFull,
    ShuttingDown,
)
from sam2serve.grpc_status import status_for
from sam2serve.jobs import CancelOutcome, JobFinished, JobSnapshot, JobState, JobStore
from sam2serve.jobs.memory import MemoryJobStore
from sam2serve.jobs.model import TRANSITIONS

STORES = ["memory", pytest.param("redis", marks=needs_redis)]


@pytest.fixture(params=STORES)
def make_store(request: pytest.FixtureRequest) -> Callable[..., JobStore]:
    """A factory of stores of one kind (call it on the event loop); Redis stores share a fresh prefix."""
    if request.param == "memory":
        return lambda **options: MemoryJobStore(**options)
    from sam2serve.jobs.redis import RedisJobStore

    url, prefix = request.getfixturevalue("redis_url"), f"contract-{uuid.uuid4().hex[:8]}:"
    return lambda **options: RedisJobStore(url, prefix=prefix, heartbeat_s=60, **options)


def scenario(make_store: Callable[..., JobStore], body: Callable[..., Awaitable[None]], **options: object) -> None:
    """Run `body(store, events)` on a fresh event loop with a started store that records its events."""

    async def main() -> None:
        events: list[JobFinished] = []
        store = make_store(on_finished=events.append, **options)
        await store.start()
        try:
            await body(store, events)
        finally:
            await store.close()

    asyncio.run(main())


async def in_thread(call: Callable[[], object]) -> object:
    """A store's thread-side call, made from a thread as a worker makes it."""
    return await asyncio.get_running_loop().run_in_executor(None, call)


async def settled(store: JobStore, job_id: str) -> JobSnapshot:
    """The snapshot after thread-side writes (`in_thread` returns after the loop ran what they scheduled)."""
    return await store.snapshot(job_id)


def test_a_job_goes_through_queue_claim_progress_logs_and_completion(make_store):
    async def body(store: JobStore, events: list[JobFinished]) -> None:
        first, second = await store.add(request()), await store.add(request())
        assert (first.state, first.queue_position, second.queue_position) == (JobState.IN_QUEUE, 0, 1)
        claim = await store.claim(1.0)
        assert claim is not None and claim.job_id == first.id and claim.request.image_value == b"image"
        running = await store.snapshot(first.id)
        assert running.state is JobState.IN_PROGRESS and running.started_at is not None
        assert (await store.snapshot(second.id)).queue_position == 0  # moved up
        await in_thread(lambda: store.report_progress(claim, 0.5))
        await in_thread(lambda: store.add_log(claim, "half way"))
        halfway = await settled(store, first.id)
        assert halfway.progress == 0.5 and [m for _, m in halfway.logs] == ["half way"]
        assert not await in_thread(lambda: store.stop_requested(claim))
        with pytest.raises(JobNotFinished, match="is IN_PROGRESS"):
            await store.result(first.id)
        assert await store.finish(claim, JobState.COMPLETED, outcome=outcome(3))
        store.release(claim)
        done = await store.snapshot(first.id)
        assert done.state is JobState.COMPLETED and done.finished_at >= done.started_at >= done.submitted_at
        result = await store.result(first.id)
        assert result.outcome.rendered.mask_count == 3 and result.request.image_value == b""  # image dropped
        assert result.id == first.id and result.queue_seconds == done.started_at - done.submitted_at
        assert [(e.id, e.state) for e in events] == [(first.id, JobState.COMPLETED)]
        assert events[0].outcome.rendered.mask_count == 3 and events[0].started_at == done.started_at
        assert not await store.finish(claim, JobState.FAILED, error=InvalidInput("late"))  # ended: no change

    scenario(make_store, body)


def test_failures_keep_a_public_error_and_hide_a_bugs_details(make_store):
    async def body(store: JobStore, events: list[JobFinished]) -> None:
        for error in (InvalidInput("image_bytes is not a supported image"), ValueError("secret internals")):
            job = await store.add(request())
            claim = await store.claim(1.0)
            assert await store.finish(claim, JobState.FAILED, error=error)
            failed = await store.snapshot(job.id)
            assert failed.state is JobState.FAILED and status_for(failed.error) == status_for(error)
            with pytest.raises(type(failed.error)) as raised:
                await store.result(job.id)
            assert status_for(raised.value) == status_for(error) and "secret" not in str(raised.value)
        assert [e.state for e in events] == [JobState.FAILED, JobState.FAILED]
        with pytest.raises(JobNotFound, match="no request with id 'nope'"):
            await store.snapshot("nope")
        with pytest.raises(JobNotFound):
            await store.result("nope")
        with pytest.raises(JobNotFound):
            await store.cancel("nope")

    scenario(make_store, body)


def test_the_queue_bound(make_store):
    async def body(store: JobStore, events: list[JobFinished]) -> None:
        await store.add(request())
        await store.add(request())
        with pytest.raises(QueueFull, match=r"the queue is full \(2 requests waiting\)"):
            await store.add(request())
        assert store.waiting() == 2
        claim = await store.claim(1.0)
        assert claim is not None and store.waiting() == 1
        await store.add(request())  # room again

    scenario(make_store, body, queue_size=2)


def test_the_byte_budget_of_waiting_images(make_store):
    """What waiting jobs hold of their images is bounded (in Redis: all replicas together), so a full queue
    of large images cannot exhaust memory; the job that runs no longer counts."""

    async def body(store: JobStore, events: list[JobFinished]) -> None:
        await store.add(request())  # b"image": 5 bytes
        await store.add(request())
        with pytest.raises(QueueFull, match=r"the queue holds 10 bytes of images and this request's 5 bytes "
                                            r"would pass its budget of 12 bytes"):
            await store.add(request())
        assert status_for(QueueFull("x"))[0].name == "RESOURCE_EXHAUSTED"
        await store.claim(1.0)
        await store.add(request())  # room again

    scenario(make_store, body, queue_bytes=12)


def test_cancel_in_the_queue_and_in_progress(make_store):
    async def body(store: JobStore, events: list[JobFinished]) -> None:
        running, queued, behind = [await store.add(request()) for _ in range(3)]
        claim = await store.claim(1.0)
        assert claim.job_id == running.id
        outcome_, snapshot = await store.cancel(queued.id)
        assert outcome_ is CancelOutcome.CANCELLED_IN_QUEUE and snapshot.state is JobState.CANCELLED
        assert (await store.snapshot(behind.id)).queue_position == 0  # moved up
        assert (await store.cancel(queued.id))[0] is CancelOutcome.ALREADY_CANCELLED
        with pytest.raises(JobCancelled):
            await store.result(queued.id)

        outcome_, snapshot = await store.cancel(running.id)
        assert outcome_ is CancelOutcome.CANCELLING_IN_PROGRESS and snapshot.state is JobState.IN_PROGRESS
        assert any("stopping at the next decoder batch" in m for _, m in snapshot.logs)
        assert await in_thread(lambda: store.stop_requested(claim))
        assert await store.finish(claim, JobState.CANCELLED)
        assert (await store.cancel(running.id))[0] is CancelOutcome.ALREADY_CANCELLED

        done = await store.claim(1.0)
        assert done.job_id == behind.id and await store.finish(done, JobState.COMPLETED, outcome=outcome())
        assert (await store.cancel(behind.id))[0] is CancelOutcome.ALREADY_FINISHED
        assert [(e.id, e.state) for e in events] == [(queued.id, JobState.CANCELLED), (running.id, JobState.CANCELLED),
                                                      (behind.id, JobState.COMPLETED)]
        assert events[0].started_at is None and events[0].request.image_value == b""

    scenario(make_store, body)


def test_a_stale_claim_writes_nothing(make_store):
    """A claim whose job went back to the queue and was claimed again: its progress, logs and final state
    are refused, and it is told to stop; the new claim's are kept."""

    async def body(store: JobStore, events: list[JobFinished]) -> None:
        job = await store.add(request())
        stale = await store.claim(1.0)
        await store.hand_back(stale)
        requeued = await store.snapshot(job.id)
        assert requeued.state is JobState.IN_QUEUE and requeued.queue_position == 0 and requeued.progress == 0
        current = await store.claim(1.0)
        assert current.job_id == job.id and current.token != stale.token
        before = await store.snapshot(job.id)
        await in_thread(lambda: store.report_progress(stale, 0.9))
        await in_thread(lambda: store.add_log(stale, "from the stale claim"))
        assert await settled(store, job.id) == before
        assert await in_thread(lambda: store.stop_requested(stale))
        assert not await in_thread(lambda: store.stop_requested(current))
        assert not await store.finish(stale, JobState.COMPLETED, outcome=outcome(1))
        assert (await store.snapshot(job.id)) == before and not events

        await in_thread(lambda: store.report_progress(current, 1.0))
        assert (await settled(store, job.id)).progress == 1.0
        assert await store.finish(current, JobState.COMPLETED, outcome=outcome(2))
        assert (await store.result(job.id)).outcome.rendered.mask_count == 2
        await in_thread(lambda: store.add_log(current, "after the end"))
        assert not any("after the end" in m for _, m in (await settled(store, job.id)).logs)

    scenario(make_store, body)


def test_changes_stream_every_state_along_the_table(make_store):
    async def body(store: JobStore, events: list[JobFinished]) -> None:
        ahead, job = await store.add(request()), await store.add(request())
        seen: list[JobSnapshot] = []
        changed = asyncio.Event()

        async def watch() -> None:
            async for snapshot in store.changes(job.id):
                seen.append(snapshot)
                changed.set()

        async def next_change() -> JobSnapshot:
            await changed.wait()
            changed.clear()
            return seen[-1]

        watcher = asyncio.create_task(watch())
        assert (await next_change()).queue_position == 1
        first = await store.claim(1.0)  # `ahead` leaves the queue: `job` moves up
        assert first.job_id == ahead.id
        while (await next_change()).queue_position != 0:
            pass
        claim = await store.claim(1.0)
        while (await next_change()).state is not JobState.IN_PROGRESS:
            pass
        await store.hand_back(claim)
        while (await next_change()).state is not JobState.IN_QUEUE:
            pass
        claim = await store.claim(1.0)
        await in_thread(lambda: store.report_progress(claim, 0.25))
        while (await next_change()).progress != 0.25:
            pass
        await store.finish(claim, JobState.COMPLETED, outcome=outcome())
        await asyncio.wait_for(watcher, 30)
        assert seen[-1].state is JobState.COMPLETED
        states = [s.state for s in seen]
        for old, new in itertools.pairwise(states):
            assert old == new or new in TRANSITIONS[old], (old, new)
        assert {JobState.IN_QUEUE, JobState.IN_PROGRESS, JobState.COMPLETED} <= set(states)

    scenario(make_store, body)


def test_finished_jobs_expire(make_store):
    async def body(store: JobStore, events: list[JobFinished]) -> None:
        job = await store.add(request())
        claim = await store.claim(1.0)
        await store.finish(claim, JobState.COMPLETED, outcome=outcome())
        assert (await store.result(job.id)).outcome.rendered.mask_count == 2
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # expiry is a matter of time passing: poll for it
            try:
                await store.snapshot(job.id)
            except JobNotFound:
                break
            await asyncio.sleep(0.1)
        with pytest.raises(JobNotFound):
            await store.result(job.id)

    scenario(make_store, body, result_ttl_s=1)


# -- the worker over each store -----------------------------------------------------------------------------
class _UntilStopped:
    """Reports progress batch by batch until told to stop; raises `Cancelled` then, as the generator does.
    `started` is set once the first batch was reported."""

    def __init__(self) -> None:
        self.started = threading.Event()

    def __call__(self, request, control):
        from sam2serve.domain import Cancelled

        for batch in range(1, 10_000):
            if control.should_stop():
                raise Cancelled
            control.progress(batch, 10_000)
            if batch == 1:
                control.log(f"batch {batch}")
                self.started.set()  # a batch has been reported
            time.sleep(0.01)  # one "decoder batch" of work
        return outcome()


def _fails_with(error: Exception):
    def work(request, control):
        raise error

    return work


def test_the_worker_completes_fails_and_cancels(make_store):
    async def body(store: JobStore, events: list[JobFinished]) -> None:
        for work, state, code in ((lambda r, c: outcome(4), JobState.COMPLETED, None),
                                  (_fails_with(InvalidInput("bad image")), JobState.FAILED, "INVALID_ARGUMENT"),
                                  (_fails_with(ZeroDivisionError("oops")), JobState.FAILED, "INTERNAL")):
            jobs = service(store, work)
            jobs.worker.start()
            final = await jobs.wait((await jobs.submit(request())).id)
            assert await jobs.drain(30)
            await jobs.worker.close()
            assert final.state is state
            if code is not None:
                assert status_for(final.error)[0].name == code
        slow = _UntilStopped()
        jobs = service(store, slow)
        jobs.worker.start()
        job = await jobs.submit(request())
        await asyncio.get_running_loop().run_in_executor(None, slow.started.wait, 30)
        assert (await jobs.cancel(job.id))[0] is CancelOutcome.CANCELLING_IN_PROGRESS
        final = await jobs.wait(job.id)
        assert final.state is JobState.CANCELLED and final.progress < 1.0
        assert any(m.startswith("batch ") for _, m in final.logs)
        assert await jobs.drain(30)  # its worker is done with the job: the store has said so to listeners
        await jobs.worker.close()
        assert [e.state for e in events] == [JobState.COMPLETED, JobState.FAILED, JobState.FAILED,
                                             JobState.CANCELLED]

    scenario(make_store, body)


def test_a_job_past_the_time_limit_stops_and_fails_with_deadline_exceeded(make_store):
    async def body(store: JobStore, events: list[JobFinished]) -> None:
        jobs = service(store, _UntilStopped(), time_limit_s=0.5)  # ~100 s of batches without the limit
        jobs.worker.start()
        job = await jobs.submit(request())
        final = await asyncio.wait_for(jobs.wait(job.id), 60)
        assert final.state is JobState.FAILED and isinstance(final.error, JobTimedOut) and final.progress < 0.5
        code, message = status_for(final.error)
        assert code.name == "DEADLINE_EXCEEDED" and "time limit of 0.5 s per job" in message
        assert [e.state for e in events] == [JobState.FAILED]
        assert await jobs.drain(30)
        await jobs.worker.close()

    scenario(make_store, body)


def test_run_now_returns_the_result_or_raises_the_jobs_error(make_store):
    async def body(store: JobStore, events: list[JobFinished]) -> None:
        jobs = service(store, lambda r, c: outcome(5))
        jobs.worker.start()
        result = await jobs.run(request())
        assert result.outcome.rendered.mask_count == 5 and result.request.image_value == b""
        await jobs.worker.close()
        jobs = service(store, _fails_with(InvalidInput("image_url refused")))
        jobs.worker.start()
        with pytest.raises(InvalidInput, match="image_url refused"):
            await jobs.run(request())
        await jobs.worker.close()

    scenario(make_store, body)


def test_a_caller_that_leaves_cancels_its_job(make_store):
    async def body(store: JobStore, events: list[JobFinished]) -> None:
        slow = _UntilStopped()
        jobs = service(store, slow)
        jobs.worker.start()
        submitted: list[str] = []

        async def caller() -> None:
            async with jobs.attached(request()) as job:
                submitted.append(job.id)
                await asyncio.Event().wait()  # waits for something of its own until it is cancelled

        call = asyncio.create_task(caller())
        await asyncio.get_running_loop().run_in_executor(None, slow.started.wait, 30)
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        assert (await jobs.wait(submitted[0])).state is JobState.CANCELLED
        assert await jobs.drain(30)  # its worker is done with the job: the store has said so to listeners
        assert [e.state for e in events] == [JobState.CANCELLED]
        await jobs.worker.close()

    scenario(make_store, body)


def test_drain_works_off_its_own_queue_or_leaves_a_shared_one(make_store):
    async def body(store: JobStore, events: list[JobFinished]) -> None:
        release = threading.Event()
        started = threading.Event()

        def work(request, control):
            started.set()
            release.wait(30)
            return outcome()

        jobs = service(store, work)
        jobs.worker.start()
        running = await jobs.submit(request())
        queued = await jobs.submit(request())
        await asyncio.get_running_loop().run_in_executor(None, started.wait, 30)
        drained = asyncio.create_task(jobs.drain(30))
        await asyncio.sleep(0)  # let the drain task begin: it refuses new work before its first wait
        with pytest.raises(ShuttingDown, match="shutting down"):
            await jobs.submit(request())
        release.set()
        assert await drained
        assert (await jobs.status(running.id)).state is JobState.COMPLETED
        left = (await jobs.status(queued.id)).state
        assert left is (JobState.IN_QUEUE if store.shared else JobState.COMPLETED)
        await jobs.worker.close()

    scenario(make_store, body)
