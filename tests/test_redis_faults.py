"""The shared queue through Redis faults, on a real redis-server that the tests kill and restart: calls
after a restart succeed at their first try (stale pooled connections reconnect), watchers re-subscribe,
what survives a restart without persistence and with AOF, a lost reply to Submit neither fails a queued
job nor queues it twice, a stale claim's progress and logs are fenced, and 1 000 watchers share one pub/sub
connection of a 16-connection pool. No engines: the runner is a function."""

from __future__ import annotations

import asyncio
import threading

import pytest
import redis
import redis.asyncio as aioredis
from redis.asyncio.connection import AbstractConnection

from conftest import REDIS_SERVER, require
from jobfakes import outcome, request, service
from redisproc import RedisProcess
from sam2serve.errors import JobNotFound, QueueUnavailable
from sam2serve.jobs import JobService, JobState
from sam2serve.jobs.redis import RedisJobStore


@pytest.fixture
def redis_server(tmp_path):
    require(REDIS_SERVER is not None, "redis-server (Debian's redis-server) is not installed")
    server = RedisProcess(tmp_path).start()
    yield server
    server.stop()


@pytest.fixture
def redis_aof(tmp_path):
    require(REDIS_SERVER is not None, "redis-server (Debian's redis-server) is not installed")
    server = RedisProcess(tmp_path, aof=True, fsync="always").start()
    yield server
    server.stop()


class Gate:
    """A runner that holds each job until the gate opens."""

    def __init__(self) -> None:
        self.started, self.open = threading.Semaphore(0), threading.Event()

    def __call__(self, req, control):
        self.started.release()
        self.open.wait(60)
        return outcome()

    async def wait_started(self, count: int = 1) -> None:
        loop = asyncio.get_running_loop()
        for _ in range(count):
            assert await loop.run_in_executor(None, self.started.acquire, True, 30)


def queue(url: str, work=lambda req, control: outcome(), workers: int = 1, **options) -> JobService:
    return service(RedisJobStore(url, heartbeat_s=0.2, **options), work, workers=workers)


async def until(condition, timeout_s: float = 20.0) -> None:
    """Poll a condition on Redis (another process's state has no event to wait on here)."""
    async with asyncio.timeout(timeout_s):
        while not await condition():
            await asyncio.sleep(0.05)


def test_calls_after_a_redis_restart_succeed_at_their_first_try(redis_server):
    async def scenario() -> None:
        replica = queue(redis_server.url, workers=2)
        await replica.start()
        store = replica.store
        for _ in range(3):  # fills the pool with connections the restart will break
            assert (await replica.wait((await replica.submit(request())).id)).state is JobState.COMPLETED
        redis_server.restart()
        failures = 0
        for _ in range(5):
            try:
                job = (await replica.submit(request())).id
                assert (await replica.wait(job)).state is JobState.COMPLETED
                assert (await replica.status(job)).state is JobState.COMPLETED
            except QueueUnavailable:
                failures += 1
        assert failures == 0
        # The heartbeat is registered again by itself (a restart without persistence forgot it).
        probe = aioredis.Redis.from_url(redis_server.url)
        await until(lambda: probe.zscore(store._key("replicas"), store.replica_id))
        await probe.aclose()
        await replica.close()

    asyncio.run(scenario())


def test_a_watcher_open_across_a_restart_sees_its_job_end(redis_aof):
    async def scenario() -> None:
        gate = Gate()
        replica = queue(redis_aof.url, gate)
        await replica.start()
        job = (await replica.submit(request())).id
        await gate.wait_started()
        seen: list[JobState] = []

        async def watch() -> None:
            async for snapshot in replica.watch(job):
                seen.append(snapshot.state)

        watcher = asyncio.create_task(watch())
        await until(lambda: asyncio.sleep(0, bool(seen)))
        redis_aof.restart()
        gate.open.set()  # the job ends after the restart: only a re-subscribed watcher hears of it promptly
        async with asyncio.timeout(4):  # well under the watchers' 5 s re-read
            await watcher
        assert seen[0] is JobState.IN_PROGRESS and seen[-1] is JobState.COMPLETED
        await replica.close()

    asyncio.run(scenario())


def test_without_persistence_a_restart_loses_the_jobs_in_flight_and_says_so(redis_server):
    async def scenario() -> None:
        gate = Gate()
        replica = queue(redis_server.url, gate)
        await replica.start()
        running = (await replica.submit(request())).id
        await gate.wait_started()
        queued = (await replica.submit(request())).id
        redis_server.restart()
        for job in (running, queued):
            with pytest.raises(JobNotFound, match="unknown, or its result expired"):
                await replica.status(job)
        gate.open.set()
        # The replica is not stuck: the lost run was refused (its claim is gone), new jobs run.
        assert (await replica.wait((await replica.submit(request())).id)).state is JobState.COMPLETED
        await replica.close()

    asyncio.run(scenario())


def test_with_aof_queued_and_running_jobs_survive_a_crash_of_redis_and_complete(redis_aof):
    async def scenario() -> None:
        gate = Gate()
        replica = queue(redis_aof.url, gate)
        await replica.start()
        running = (await replica.submit(request())).id
        await gate.wait_started()
        queued = (await replica.submit(request())).id
        redis_aof.restart()  # SIGKILL: only what the AOF holds comes back
        assert (await replica.status(running)).state is JobState.IN_PROGRESS
        assert (await replica.status(queued)).state is JobState.IN_QUEUE
        gate.open.set()
        for job in (running, queued):
            assert (await replica.wait(job)).state is JobState.COMPLETED
            assert (await replica.result(job)).outcome.rendered.mask_count == 2
        assert int(await replica.store._redis.hget(replica.store._key("job", running), "attempts")) == 0
        await replica.close()

    asyncio.run(scenario())


class LoseOneReply:
    """Fault injection: the reply to the next script call (EVALSHA) is lost after Redis ran it, as when a
    connection breaks between Redis's reply and our read of it."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.armed, self.lost = False, 0
        send, read = AbstractConnection.send_command, AbstractConnection.read_response
        fault = self

        async def send_command(conn, *args, **kwargs):
            conn._drop_next_reply = fault.armed and str(args[0]).upper() == "EVALSHA"
            return await send(conn, *args, **kwargs)

        async def read_response(conn, *args, **kwargs):
            response = await read(conn, *args, **kwargs)
            if getattr(conn, "_drop_next_reply", False):
                conn._drop_next_reply, fault.armed = False, False
                fault.lost += 1
                await conn.disconnect()
                raise redis.ConnectionError("reply lost (injected)")
            return response

        monkeypatch.setattr(AbstractConnection, "send_command", send_command)
        monkeypatch.setattr(AbstractConnection, "read_response", read_response)


def test_a_lost_reply_to_submit_neither_fails_a_queued_job_nor_queues_it_twice(redis_server, monkeypatch):
    async def scenario() -> None:
        fault = LoseOneReply(monkeypatch)
        front = queue(redis_server.url, workers=0)
        await front.start()
        fault.armed = True
        submitted = await front.submit(request())  # before: UNAVAILABLE for a job that was queued
        assert fault.lost == 1
        assert submitted.state is JobState.IN_QUEUE and submitted.queue_position == 0
        pending = await front.store._redis.lrange(front.store._key("pending"), 0, -1)
        assert pending == [submitted.id.encode()]  # queued once
        await front.close()

    asyncio.run(scenario())


def test_a_lost_reply_to_a_claim_or_a_finish_changes_nothing_twice(redis_server, monkeypatch):
    async def scenario() -> None:
        fault = LoseOneReply(monkeypatch)
        finished: list[str] = []
        store = RedisJobStore(redis_server.url, heartbeat_s=60, on_finished=lambda e: finished.append(e.id))
        await store.start()
        job = (await store.add(request())).id
        fault.armed = True
        claim = await store.claim(1.0)  # its script's reply is lost; the retry finds the claim made
        assert claim is not None and fault.lost == 1
        fault.armed = True
        assert await store.finish(claim, JobState.COMPLETED, outcome=outcome())
        assert fault.lost == 2 and finished == [job]  # one JobFinished (one webhook), not zero
        assert (await store.snapshot(job)).state is JobState.COMPLETED
        store.release(claim)
        await store.close()

    asyncio.run(scenario())


def test_a_stale_claims_progress_and_logs_are_fenced_after_a_takeover(redis_server):
    async def scenario() -> None:
        stalled = RedisJobStore(redis_server.url, heartbeat_s=60)
        taker = RedisJobStore(redis_server.url, heartbeat_s=60)
        for store in (stalled, taker):
            await store.start()
        job = (await stalled.add(request())).id
        stale = await stalled.claim(1.0)
        assert stale is not None
        await stalled._redis.zadd(stalled._key("replicas"), {stalled.replica_id: 0})  # presumed dead
        assert await taker.requeue_lost_jobs() == 1
        current = await taker.claim(1.0)
        assert current is not None and current.job_id == job
        before = await taker.snapshot(job)
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, stalled.report_progress, stale, 0.9)
        await loop.run_in_executor(None, stalled.add_log, stale, "from the presumed-dead replica")
        after = await taker.snapshot(job)
        assert (after.version, after.progress, after.logs) == (before.version, before.progress, before.logs)
        assert await loop.run_in_executor(None, stalled.stop_requested, stale)
        assert not await stalled.finish(stale, JobState.COMPLETED, outcome=outcome())
        assert await taker.finish(current, JobState.COMPLETED, outcome=outcome(3))
        for store, claim in ((stalled, stale), (taker, current)):
            store.release(claim)
            await store.close()

    asyncio.run(scenario())


WATCHERS, JOBS, POOL = 1000, 10, 16


def test_a_thousand_watchers_share_one_pubsub_connection_of_a_small_pool(redis_server):
    """Before: each watcher held a pool connection for its pub/sub (1 100 watchers on a 1 024 pool: 588
    'Too many connections'). Now a replica's watchers share one, and reads wait for a free connection."""

    async def scenario() -> None:
        gate = Gate()
        replica = queue(redis_server.url, gate, workers=JOBS, max_connections=POOL)
        await replica.start()
        jobs = [(await replica.submit(request())).id for _ in range(JOBS)]
        await gate.wait_started(JOBS)
        opened = asyncio.Semaphore(0)
        finals: list[object] = []

        async def watch(job: str) -> None:
            seen_running = False
            try:
                async for snapshot in replica.watch(job):
                    if snapshot.state is JobState.IN_PROGRESS and not seen_running:
                        seen_running = True
                        opened.release()
                    last = snapshot.state
                finals.append(last)
            except QueueUnavailable as e:  # before: "Too many connections"
                finals.append(e)
                if not seen_running:
                    opened.release()

        watchers = [asyncio.create_task(watch(jobs[i % JOBS])) for i in range(WATCHERS)]
        async with asyncio.timeout(60):
            for _ in range(WATCHERS):  # every watcher is subscribed and has seen its job running (or failed)
                await opened.acquire()
        gate.open.set()
        async with asyncio.timeout(60):
            await asyncio.gather(*watchers)
        failed = [f for f in finals if isinstance(f, Exception)]
        assert not failed, f"{len(failed)} of {WATCHERS} watchers failed: {failed[0]}"
        assert finals == [JobState.COMPLETED] * WATCHERS
        pool = replica.store._redis.connection_pool
        assert replica.store._events.connections == 1
        assert len(pool._in_use_connections) + len(pool._available_connections) <= POOL
        await replica.close()

    asyncio.run(scenario())
