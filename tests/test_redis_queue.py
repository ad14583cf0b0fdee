"""The queue shared through Redis: two replicas (in-process servers with real engines) on one real
redis-server, and the queue itself where a replica has to die: jobs submitted on one replica are watched,
fetched and cancelled on the other, the bound holds for both, a lost replica's job runs again once."""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import replace

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from conftest import needs_export_tools, needs_redis
from grpc_harness import ServerThread, quick_request, slow_request, wait_for_state
from jobfakes import outcome as _outcome
from jobfakes import request as _request
from jobfakes import service
from redisproc import RedisProcess
from sam2serve import jobcodec
from sam2serve.amg.params import GeneratorParams
from sam2serve.config import ServerConfig
from sam2serve.domain import OutputOptions, SegmentOutcome, SegmentRequest
from sam2serve.errors import JobFailed, QueueUnavailable
from sam2serve.jobs import JobService, JobState
from sam2serve.jobs.redis import RedisJobStore
from sam2serve.v1 import sam2serve_pb2 as pb

State = pb.RequestStatus
def redis_queue(work, url: str, workers: int = 1, **store_options) -> JobService:
    """A replica's job layer: a Redis store and a worker running `work(request, control)`."""
    return service(RedisJobStore(url, **store_options), work, workers=workers)


def test_codec_round_trips_requests_and_outcomes():
    grid = (np.random.default_rng(0).random((9, 2)),)
    request = SegmentRequest("bytes", b"\x00\x01image", GeneratorParams(points_per_side=None, point_grids=grid),
                             OutputOptions(fmt="jpeg", max_masks=3), webhook_url="http://hook")
    back = jobcodec.decode(jobcodec.encode(request))
    assert back.image_value == request.image_value and back.output == request.output
    assert back.params.point_grids[0].dtype == grid[0].dtype
    np.testing.assert_array_equal(back.params.point_grids[0], grid[0])
    outcome = _outcome()
    assert jobcodec.decode(jobcodec.encode(outcome)) == outcome


def test_codec_refuses_what_it_did_not_write():
    data = jobcodec.encode(_outcome())
    deep = b"[" * 100_000 + b"]" * 100_000  # valid JSON, deeper than any recursion limit
    nested = len(deep).to_bytes(4, "big") + deep
    for bad in (b"", b"\x00\x00\x00\x05{\"a\":", data[:-3], b"\x00\x00\x00\x12{\"$type\":\"os\",\"fields\":{}}",
                nested):
        with pytest.raises(jobcodec.CodecError):
            jobcodec.decode(bad)


@needs_redis
def test_an_unreachable_redis_fails_at_startup_with_its_address(tmp_path):
    async def start() -> None:
        queue = redis_queue(lambda *a: _outcome(), f"unix://{tmp_path}/nothing.sock")
        try:
            await queue.start()
        finally:
            await queue.close()

    with pytest.raises(QueueUnavailable, match=r"nothing\.sock"):
        asyncio.run(start())


# -- two replicas behind one Redis -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def replicas(tiny_engine, redis_url):
    config = ServerConfig(workers=1, queue_size=2, redis_url=redis_url, redis_prefix="replicas:")
    a, b = ServerThread(config, tiny_engine), ServerThread(config, tiny_engine)
    yield a, b
    a.stop()
    b.stop()


@needs_export_tools
@needs_redis
def test_a_job_submitted_on_one_replica_is_watched_and_fetched_on_the_other(replicas):
    a, b = replicas
    submitted = a.stub.Submit(quick_request(return_rle=True), timeout=10)
    states = [s.state for s in b.stub.WatchStatus(pb.StatusRequest(request_id=submitted.request_id), timeout=120)]
    assert states[-1] == State.COMPLETED and states == sorted(states)
    status = b.stub.GetStatus(pb.StatusRequest(request_id=submitted.request_id, logs=True), timeout=10)
    assert status.progress == 1.0 and any("masks from" in line.message for line in status.logs)
    from_a = a.stub.GetResult(pb.ResultRequest(request_id=submitted.request_id), timeout=10)
    from_b = b.stub.GetResult(pb.ResultRequest(request_id=submitted.request_id), timeout=10)
    assert from_a.total_masks >= 1 and from_a.SerializeToString() == from_b.SerializeToString()
    assert b.stub.AutoSegment(quick_request(), timeout=120).total_masks >= 1
    with pytest.raises(grpc.RpcError) as unknown:
        b.stub.GetStatus(pb.StatusRequest(request_id="no-such-id"), timeout=10)
    assert unknown.value.code() == grpc.StatusCode.NOT_FOUND


@needs_export_tools
@needs_redis
def test_the_queue_bound_and_cancel_hold_across_replicas(replicas):
    a, b = replicas
    running = [a.stub.Submit(slow_request(), timeout=10).request_id for _ in range(2)]
    for request_id in running:  # one on each replica (one worker each)
        wait_for_state(b.stub, request_id, State.IN_PROGRESS)
    queued = [b.stub.Submit(slow_request(), timeout=10), a.stub.Submit(slow_request(), timeout=10)]
    assert [q.queue_position for q in queued] == [0, 1]
    with pytest.raises(grpc.RpcError) as full:
        b.stub.Submit(quick_request(), timeout=10)
    assert full.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "queue is full" in full.value.details()

    for q in queued:
        cancelled = a.stub.Cancel(pb.CancelRequest(request_id=q.request_id), timeout=10)
        assert cancelled.outcome == pb.CancelResponse.CANCELLED_IN_QUEUE and cancelled.status.state == State.CANCELLED
    for request_id in running:  # cancelled through the replica that is (maybe) not running it
        stopping = b.stub.Cancel(pb.CancelRequest(request_id=request_id), timeout=10)
        assert stopping.outcome == pb.CancelResponse.CANCELLING_IN_PROGRESS
    for request_id in running:
        assert wait_for_state(a.stub, request_id, State.CANCELLED).progress < 1.0
    again = b.stub.Cancel(pb.CancelRequest(request_id=running[0]), timeout=10)
    assert again.outcome == pb.CancelResponse.ALREADY_CANCELLED
    with pytest.raises(grpc.RpcError) as gone:
        a.stub.GetResult(pb.ResultRequest(request_id=running[0]), timeout=10)
    assert gone.value.code() == grpc.StatusCode.CANCELLED


@needs_export_tools
@needs_redis
def test_a_stopping_replica_lets_calls_finish_whose_jobs_run_elsewhere(tiny_engine, redis_url):
    """SIGTERM on a replica that only accepts (workers=0): its Subscribe call keeps waiting for the job
    another replica runs, within the drain period, instead of being cut and cancelling the job."""
    config = ServerConfig(redis_url=redis_url, redis_prefix="stopping:", drain_seconds=120)
    front = ServerThread(replace(config, workers=0), tiny_engine)
    runner = ServerThread(replace(config, workers=1), tiny_engine)
    try:
        events = front.stub.Subscribe(quick_request(points_per_side=8), timeout=120)
        first = next(events)
        assert first.status.state in (State.IN_QUEUE, State.IN_PROGRESS)
        stopping = threading.Thread(target=front.run, args=(front.running.shutdown(),))
        stopping.start()
        rest = list(events)
        stopping.join(60)
        assert rest[-1].WhichOneof("event") == "result" and rest[-1].result.total_masks >= 1
        assert rest[-2].status.state == State.COMPLETED
    finally:
        front.channel.close()
        front.loop.call_soon_threadsafe(front.loop.stop)
        runner.stop()


@needs_export_tools
@needs_redis
def test_health_follows_redis_and_the_first_calls_after_a_restart_succeed(tiny_engine, tmp_path):
    """Before: health stayed SERVING while Redis was down, and the first AutoSegment after a restart failed
    with UNAVAILABLE (a broken pooled connection)."""
    redis_server = RedisProcess(tmp_path).start()
    replica = ServerThread(ServerConfig(workers=1, redis_url=redis_server.url, redis_prefix="health:"), tiny_engine)
    try:
        assert replica.stub.AutoSegment(quick_request(), timeout=120).total_masks >= 1  # connections pooled
        health = health_pb2_grpc.HealthStub(replica.channel)
        statuses = iter(health.Watch(health_pb2.HealthCheckRequest(service=""), timeout=60))
        assert next(statuses).status == health_pb2.HealthCheckResponse.SERVING
        redis_server.stop()
        assert next(statuses).status == health_pb2.HealthCheckResponse.NOT_SERVING  # within a heartbeat
        with pytest.raises(grpc.RpcError) as down:
            replica.stub.AutoSegment(quick_request(), timeout=60)
        assert down.value.code() == grpc.StatusCode.UNAVAILABLE and "unreachable" in down.value.details()
        redis_server.start()
        assert next(statuses).status == health_pb2.HealthCheckResponse.SERVING  # by itself
        for _ in range(2):
            assert replica.stub.AutoSegment(quick_request(), timeout=120).total_masks >= 1
    finally:
        replica.stop()
        redis_server.stop()


# -- a replica that dies -----------------------------------------------------------------------------------
class _Blocking:
    """A runner that holds its job until released: the replica "dies" while it runs."""

    def __init__(self) -> None:
        self.started, self.release = threading.Event(), threading.Event()

    def __call__(self, request, control) -> SegmentOutcome:
        self.started.set()
        self.release.wait(60)
        return _outcome()


async def _until(event: threading.Event) -> None:
    """Wait (off the event loop) for a runner thread's signal."""
    await asyncio.get_running_loop().run_in_executor(None, event.wait, 30)


async def _submit_and_start(queue: JobService, started: threading.Event) -> str:
    """Submit a job and wait until its runner is running it."""
    job = (await queue.submit(_request())).id
    await _until(started)
    return job


async def _die(queue: JobService) -> None:
    """What a killed process leaves behind: its running list, and a heartbeat that has expired."""
    tasks = [*queue.worker._tasks, queue.store._keep_alive_task]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await queue.store._redis.zadd(queue.store._key("replicas"), {queue.store.replica_id: 0})


@needs_redis
def test_a_lost_replicas_job_runs_again_once_then_fails(redis_url):
    async def scenario() -> None:
        doomed = [_Blocking(), _Blocking()]
        first = redis_queue(doomed[0], redis_url, prefix="lost:", heartbeat_s=60)
        await first.start()
        job = await _submit_and_start(first, doomed[0].started)
        await _die(first)

        second = redis_queue(doomed[1], redis_url, prefix="lost:", heartbeat_s=60)
        await second.start()
        assert await second.store.requeue_lost_jobs() == 1  # back in the queue; second's worker takes it
        await _until(doomed[1].started)
        status = await second.status(job)
        assert status.state is JobState.IN_PROGRESS
        assert any("stopped; queued again" in message for _, message in status.logs)
        await _die(second)

        third = redis_queue(lambda *a: _outcome(), redis_url, prefix="lost:", heartbeat_s=60)
        await third.start()
        assert await third.store.requeue_lost_jobs() == 1
        final = await third.wait(job)
        assert final.state is JobState.FAILED and isinstance(final.error, JobFailed)
        assert "stopped 2 times" in str(final.error)
        assert await third.store.requeue_lost_jobs() == 0  # nothing left behind
        for queue, runner in ((first, doomed[0]), (second, doomed[1]), (third, None)):
            if runner is not None:
                runner.release.set()
            await queue.close()

    asyncio.run(scenario())


class _StopsWhenAsked:
    """A runner that works until `should_stop` says so, then returns anyway (as a replica that missed the
    takeover would), so that only the queue's fencing can keep its outcome out."""

    def __init__(self) -> None:
        self.started, self.stop_seen = threading.Event(), threading.Event()
        self.calls = 0

    def __call__(self, request, control) -> SegmentOutcome:
        self.calls += 1
        if self.calls > 1:  # the requeued job claimed back by this replica: a fresh claim, finished properly
            return _outcome(3)
        self.started.set()
        deadline = time.monotonic() + 60
        while not control.should_stop() and time.monotonic() < deadline:
            self.stop_seen.wait(0.02)  # one "decoder batch"
        if control.should_stop():
            self.stop_seen.set()
        return _outcome(1)


@needs_redis
def test_a_replica_wrongly_declared_lost_cannot_finish_the_job_it_lost(redis_url):
    async def scenario() -> None:
        slow = _StopsWhenAsked()
        stalled = redis_queue(slow, redis_url, prefix="fence:", heartbeat_s=60)
        await stalled.start()
        job = await _submit_and_start(stalled, slow.started)
        # Its heartbeat looks old (an event-loop stall, a partition), but it is still running the job.
        await stalled.store._redis.zadd(stalled.store._key("replicas"), {stalled.store.replica_id: 0})

        taker = redis_queue(lambda *a: _outcome(3), redis_url, prefix="fence:", heartbeat_s=60)
        await taker.start()
        assert await taker.store.requeue_lost_jobs() == 1
        final = await taker.wait(job)
        assert final.state is JobState.COMPLETED
        await _until(slow.stop_seen)
        assert slow.stop_seen.is_set()  # the stalled replica's job saw it was no longer its own
        await stalled.drain(30)
        assert (await taker.result(job)).outcome.rendered.mask_count == 3  # its late outcome was not written
        assert (await taker.status(job)).version == final.version
        for queue in (stalled, taker):
            await queue.close()

    asyncio.run(scenario())


class _FirstRunStalls:
    """First call: works until told to stop, then returns anyway. Later calls: finish at once."""

    def __init__(self) -> None:
        self.first, self.calls = _StopsWhenAsked(), 0

    def __call__(self, request, control) -> SegmentOutcome:
        self.calls += 1
        return self.first(request, control) if self.calls == 1 else _outcome(4)


@needs_redis
def test_a_job_retaken_by_the_same_replica_is_fenced_per_claim(redis_url):
    async def scenario() -> None:
        runner = _FirstRunStalls()
        stalled = redis_queue(runner, redis_url, prefix="claims:", workers=2, heartbeat_s=60)
        await stalled.start()
        job = await _submit_and_start(stalled, runner.first.started)
        await stalled.store._redis.zadd(stalled.store._key("replicas"), {stalled.store.replica_id: 0})
        front = redis_queue(lambda *a: _outcome(), redis_url, prefix="claims:", workers=0, heartbeat_s=60)
        await front.start()
        assert await front.store.requeue_lost_jobs() == 1  # the stalled replica's idle worker takes it again
        final = await front.wait(job)
        await _until(runner.first.stop_seen)
        await stalled.drain(30)
        # The first claim stopped and its CANCELLED was refused: the second claim's result stands.
        assert final.state is JobState.COMPLETED and (await front.status(job)).state is JobState.COMPLETED
        assert (await front.result(job)).outcome.rendered.mask_count == 4 and runner.calls == 2
        for queue in (stalled, front):
            await queue.close()

    asyncio.run(scenario())


@needs_redis
def test_a_closing_replica_hands_its_jobs_back_without_using_an_attempt(redis_url):
    async def scenario() -> None:
        slow = _StopsWhenAsked()
        closing = redis_queue(slow, redis_url, prefix="close:")
        await closing.start()
        job = await _submit_and_start(closing, slow.started)
        await closing.close()  # no drain (or one that timed out)
        reader = _reader(redis_url, "close:")
        status = await reader.status(job)
        await reader.close()
        assert status.state is JobState.IN_QUEUE and status.queue_position == 0
        assert any("queued again" in message for _, message in status.logs)
        successor = redis_queue(lambda *a: _outcome(), redis_url, prefix="close:")
        await successor.start()
        assert (await successor.wait(job)).state is JobState.COMPLETED
        assert await successor.store._redis.hget(successor.store._key("job", job), "attempts") == b"0"
        await successor.close()

    asyncio.run(scenario())


@needs_redis
def test_an_id_left_in_a_replicas_running_list_goes_back_to_the_queue(redis_url):
    async def scenario() -> None:
        front = redis_queue(lambda *a: _outcome(), redis_url, prefix="orphan:", workers=0)
        await front.start()
        job = (await front.submit(_request())).id
        # What a BLMOVE whose reply was lost leaves: the id moved to this replica's list, no job running.
        store = front.store
        await store._redis.lmove(store._key("pending"), store._key("running", store.replica_id), "LEFT", "RIGHT")
        await store.hand_back_orphans()  # first sighting: it might be a reply still on its way
        assert (await store._redis.lrange(store._key("pending"), 0, -1)) == []
        await store.hand_back_orphans()
        status = await front.status(job)
        assert status.state is JobState.IN_QUEUE and status.queue_position == 0
        await front.close()

    asyncio.run(scenario())


def _reader(redis_url: str, prefix: str) -> JobService:
    """A queue object used only to read (never started: no worker, no heartbeat)."""
    return redis_queue(lambda *a: _outcome(), redis_url, prefix=prefix, workers=0)


@needs_redis
def test_draining_leaves_queued_jobs_to_the_other_replicas(redis_url):
    async def scenario() -> None:
        blocking = _Blocking()
        leaving = redis_queue(blocking, redis_url, prefix="drain:")
        await leaving.start()
        running = await _submit_and_start(leaving, blocking.started)
        waiting = (await leaving.submit(_request())).id
        drained = asyncio.create_task(leaving.drain(30))
        blocking.release.set()
        assert await drained
        assert (await leaving.status(running)).state is JobState.COMPLETED
        assert (await leaving.status(waiting)).state is JobState.IN_QUEUE  # not run, not lost
        await leaving.close()

        staying = redis_queue(lambda *a: _outcome(3), redis_url, prefix="drain:")
        await staying.start()
        assert (await staying.wait(waiting)).state is JobState.COMPLETED
        assert (await staying.result(waiting)).outcome.rendered.mask_count == 3
        assert (await staying.result(waiting)).request.image_value == b""  # the image is not kept after the job
        await staying.close()

    asyncio.run(scenario())


@needs_redis
def test_each_replica_reports_its_share_of_the_shared_queue(redis_url):
    async def scenario() -> None:
        fronts = [redis_queue(lambda *a: _outcome(), redis_url, prefix="share:", workers=0) for _ in range(2)]
        for queue in fronts:
            await queue.start()
        for _ in range(3):
            await fronts[0].submit(_request())
        # An autoscaler averages the per-pod values: 3 waiting over 2 pods, as per-pod queues would report.
        assert [queue.depth() for queue in fronts] == [(1.5, 0), (1.5, 0)]
        for queue in fronts:
            await queue.close()

    asyncio.run(scenario())


def test_passwords_stay_out_of_the_printed_config():
    for url in ("redis://:s3cret@redis.example:6380/2", "redis://redis.example:6380/2?password=s3cret&ssl=1"):
        shown = ServerConfig(redis_url=url).describe()
        assert "s3cret" not in shown and "redis.example:6380" in shown

