"""A job queue that every replica shares through Redis: any replica accepts, runs, reports on and cancels
any job, so the queue API works behind a load balancer, and jobs queued on a replica that scales down are
run by the others.

Keys, under a prefix (default "sam2serve:"):
    pending             job ids waiting, oldest first; its length is bounded by queue_size for all replicas
    running:<worker>    ids a replica has taken (moved from pending atomically, so a crash leaves them here)
    replicas            sorted set: each replica's last heartbeat (Redis server time, so pod clocks don't matter)
    job:<id>            hash: state, times, progress, version, error, attempts, cancel flag
    request:<id>        the encoded request (`jobcodec`); the image is dropped when the job ends
    logs:<id>           JSON [time, message] entries
    result:<id>         the encoded outcome
    events:<id>         pub/sub channel: a message whenever the job changes
    moved               pub/sub channel: a message whenever a job leaves `pending` (queue positions move)
The keys of a finished job expire after result_ttl_s. A job whose replica's heartbeat expired goes back to
the front of the queue once; if that happens again it fails, so a request that kills replicas cannot kill
them all. A replica counts as lost after LOST_AFTER_BEATS missed heartbeats.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import time
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Any

import redis
import redis.asyncio as aioredis

from . import errors, jobcodec
from .config import _without_password
from .errors import JobCancelled, JobNotFinished, JobNotFound, QueueFull, Sam2ServeError, ShuttingDown
from .jobs import CancelOutcome, Job, JobSnapshot, JobState, Runner
from .pipeline import SegmentOutcome, SegmentRequest

log = logging.getLogger(__name__)

_PUSH_IF_ROOM = """
if redis.call('LLEN', KEYS[1]) >= tonumber(ARGV[1]) then return -1 end
return redis.call('RPUSH', KEYS[1], ARGV[2])
"""
# One job from a lost replica's list: back to the front of the queue as IN_QUEUE, unless it has used up
# its attempts (then it is only taken off the list, for the caller to fail). Atomic, so that no worker can
# start the job between the move and the state change, and two replicas never both move it.
_REQUEUE_ONE = """
local id = redis.call('RPOP', KEYS[1])
if not id then return nil end
local job = ARGV[1] .. id
local attempts = redis.call('HINCRBY', job, 'attempts', 1)
if attempts >= tonumber(ARGV[2]) then return {id, attempts, 0} end
redis.call('HSET', job, 'state', 'IN_QUEUE', 'progress', '0')
redis.call('HINCRBY', job, 'version', 1)
redis.call('LPUSH', KEYS[2], id)
return {id, attempts, 1}
"""
LOST_AFTER_BEATS = 3
MAX_ATTEMPTS = 2  # runs of one job; a job whose replica died twice fails
UNFINISHED_TTL_S = 24 * 3600  # keys of a job nobody finishes (every replica gone) are not kept forever
INTERNAL_ERROR = "internal error"


class RedisUnavailable(Sam2ServeError):
    """The shared queue's Redis cannot be reached."""


class RedisJobQueue:
    def __init__(self, runner: Runner, url: str, workers: int = 1, queue_size: int = 32,
                 result_ttl_s: float = 600.0, prefix: str = "sam2serve:",
                 on_finished: Callable[[Job], None] | None = None, heartbeat_s: float = 5.0,
                 watch_poll_s: float = 5.0) -> None:
        self._runner, self._url, self._workers = runner, url, workers
        self._queue_size, self._ttl = queue_size, max(1, int(result_ttl_s))
        self._prefix, self._on_finished = prefix, on_finished
        self._heartbeat_s, self._watch_poll_s = heartbeat_s, watch_poll_s
        self._lost_after_s = LOST_AFTER_BEATS * heartbeat_s
        self.worker_id = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._redis = aioredis.Redis.from_url(url)
        self._sync = redis.Redis.from_url(url)  # for the job threads and metrics scrapes
        self._push = self._redis.register_script(_PUSH_IF_ROOM)
        self._requeue_one = self._redis.register_script(_REQUEUE_ONE)
        # workers=0: a replica that accepts and answers but runs nothing (the others do)
        self._executor = ThreadPoolExecutor(max_workers=max(workers, 1), thread_name_prefix="sam2serve-job")
        self._accepting = True
        self._running = 0
        self._idle = asyncio.Condition()
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        """Check the connection (a clear error at startup beats one per request), then start working."""
        try:
            await self._redis.ping()
        except redis.RedisError as e:
            raise RedisUnavailable(f"cannot reach the queue's Redis at {_without_password(self._url)}: {e}") from e
        await self._beat()
        self._tasks = [asyncio.create_task(self._work(), name=f"sam2serve-redis-worker-{i}")
                       for i in range(self._workers)]
        self._tasks.append(asyncio.create_task(self._keep_alive(), name="sam2serve-redis-heartbeat"))
        log.info("job queue: Redis at %s, prefix %r, worker %s", _without_password(self._url), self._prefix,
                 self.worker_id)

    # -- submitting and reading --------------------------------------------------------------------------
    async def submit(self, request: SegmentRequest) -> JobSnapshot:
        if not self._accepting:
            raise ShuttingDown("the server is shutting down and accepts no new requests")
        job_id = uuid.uuid4().hex
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.hset(self._key("job", job_id), mapping={"state": JobState.IN_QUEUE.name, "version": 1,
                                                          "submitted_at": repr(time.time()), "progress": 0,
                                                          "attempts": 0})
            pipe.set(self._key("request", job_id), jobcodec.encode(request))
            for kind in ("job", "request"):
                pipe.expire(self._key(kind, job_id), UNFINISHED_TTL_S)
            await pipe.execute()
        if await self._push(keys=[self._key("pending")], args=[self._queue_size, job_id]) < 0:
            await self._redis.delete(self._key("job", job_id), self._key("request", job_id))
            raise QueueFull(f"the queue is full ({self._queue_size} requests waiting); retry later")
        return await self.status(job_id)

    async def status(self, job_id: str) -> JobSnapshot:
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.hgetall(self._key("job", job_id))
            pipe.lrange(self._key("logs", job_id), 0, -1)
            pipe.lpos(self._key("pending"), job_id)
            fields, logs, position = await pipe.execute()
        if not fields:
            raise JobNotFound(f"no request with id {job_id!r} (unknown, or its result expired)")
        return _snapshot(job_id, {k.decode(): v.decode() for k, v in fields.items()}, logs, position)

    async def request(self, job_id: str) -> SegmentRequest:
        """The request as submitted, without its image once the job has finished."""
        data = await self._redis.get(self._key("request", job_id))
        if data is None:
            raise JobNotFound(f"no request with id {job_id!r} (unknown, or its result expired)")
        return jobcodec.decode(data)

    async def result(self, job_id: str) -> SegmentOutcome:
        snapshot = await self.status(job_id)
        if snapshot.state is JobState.COMPLETED:
            data = await self._redis.get(self._key("result", job_id))
            if data is None:
                raise JobNotFound(f"the result of request {job_id!r} expired")
            return jobcodec.decode(data)
        if snapshot.state is JobState.CANCELLED:
            raise JobCancelled(f"request {job_id} was cancelled")
        if snapshot.state is JobState.FAILED:
            assert snapshot.error is not None
            raise snapshot.error
        raise JobNotFinished(f"request {job_id} is {snapshot.state.name}; its result is not ready")

    async def watch(self, job_id: str) -> AsyncIterator[JobSnapshot]:
        """The current state, then every change (queue position included), ending with a terminal state."""
        pubsub = self._redis.pubsub()
        await pubsub.subscribe(self._key("events", job_id), self._key("moved"))
        try:
            seen: tuple[int, int] | None = None
            while True:
                snapshot = await self.status(job_id)  # read after subscribing: no change can slip between
                if (snapshot.version, snapshot.queue_position) != seen:
                    seen = (snapshot.version, snapshot.queue_position)
                    yield snapshot
                if snapshot.state.terminal:
                    return
                # Wakes on the next change; the timeout re-reads in case Redis dropped a message.
                await pubsub.get_message(ignore_subscribe_messages=True, timeout=self._watch_poll_s)
        finally:
            await pubsub.aclose()

    async def wait(self, job_id: str) -> JobSnapshot:
        async for snapshot in self.watch(job_id):
            if snapshot.state.terminal:
                return snapshot
        raise AssertionError("watch ends with a terminal state")

    async def cancel(self, job_id: str) -> tuple[CancelOutcome, JobSnapshot]:
        snapshot = await self.status(job_id)
        if snapshot.state is JobState.CANCELLED:
            return CancelOutcome.ALREADY_CANCELLED, snapshot
        if snapshot.state.terminal:
            return CancelOutcome.ALREADY_FINISHED, snapshot
        await self._redis.hset(self._key("job", job_id), "cancel", 1)  # the runner checks it every batch
        if await self._redis.lrem(self._key("pending"), 1, job_id):
            await self._finish(job_id, JobState.CANCELLED)
            await self._redis.publish(self._key("moved"), job_id)
            return CancelOutcome.CANCELLED_IN_QUEUE, await self.status(job_id)
        snapshot = await self.status(job_id)
        if snapshot.state.terminal:  # it ended meanwhile
            return CancelOutcome.ALREADY_FINISHED, snapshot
        await self._log(job_id, "cancellation requested; stopping at the next decoder batch")
        return CancelOutcome.CANCELLING_IN_PROGRESS, await self.status(job_id)

    def depth(self) -> tuple[float, int]:
        """(this replica's share of the shared queue, jobs running here). The share is waiting jobs over live
        replicas, so that an autoscaler averaging the per-pod values sees the total over the pod count, as
        with per-pod queues. Called from metrics scrapes, off the event loop; -1 while Redis is unreachable."""
        try:
            seconds, micros = self._sync.time()
            with self._sync.pipeline(transaction=False) as pipe:
                pipe.llen(self._key("pending"))
                pipe.zcount(self._key("replicas"), seconds + micros / 1e6 - self._lost_after_s, "+inf")
                waiting, live = pipe.execute()
            return int(waiting) / max(int(live), 1), self._running
        except redis.RedisError:
            return -1.0, self._running

    async def drain(self, timeout_s: float) -> bool:
        """Stop accepting and taking jobs; wait until the running ones finish. Queued jobs stay in Redis for
        the other replicas (or this one's successor)."""
        self._accepting = False
        try:
            async with asyncio.timeout(timeout_s), self._idle:
                await self._idle.wait_for(lambda: self._running == 0)
            return True
        except TimeoutError:
            return False

    async def close(self) -> None:
        self._accepting = False
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._executor.shutdown(wait=False, cancel_futures=True)
        with contextlib.suppress(redis.RedisError):  # else the others will count it lost and requeue
            await self._requeue_from(self.worker_id)  # jobs the drain did not wait for
            await self._redis.zrem(self._key("replicas"), self.worker_id)
        await self._redis.aclose()
        self._sync.close()

    # -- working -----------------------------------------------------------------------------------------
    async def _work(self) -> None:
        pending, mine = self._key("pending"), self._key("running", self.worker_id)
        while self._accepting:
            try:
                raw = await self._redis.blmove(pending, mine, 1.0, "LEFT", "RIGHT")
            except redis.RedisError as e:
                log.warning("job queue: Redis unavailable (%s); retrying", e)
                await asyncio.sleep(self._heartbeat_s)  # back off; the connection pool reconnects
                continue
            if raw is None:
                continue
            job_id = raw.decode()
            if not self._accepting:  # drain began while waiting: hand it back at the front
                await self._redis.lmove(mine, pending, "RIGHT", "LEFT")
                return
            await self._redis.publish(self._key("moved"), job_id)
            try:
                await self._run_job(job_id)
            except redis.RedisError as e:
                log.warning("job queue: Redis failed while running %s (%s); it is requeued when this replica "
                            "is seen as lost", job_id, e)

    async def _run_job(self, job_id: str) -> None:
        fields = await self._redis.hgetall(self._key("job", job_id))
        if not fields:  # expired while queued
            await self._redis.lrem(self._key("running", self.worker_id), 1, job_id)
            return
        if fields.get(b"cancel") == b"1":
            await self._finish(job_id, JobState.CANCELLED)
            return
        self._running += 1
        request: SegmentRequest | None = None
        try:
            await self._update(job_id, {"state": JobState.IN_PROGRESS.name, "started_at": repr(time.time()),
                                        "worker": self.worker_id})
            request = await self.request(job_id)
            loop = asyncio.get_running_loop()
            outcome = await loop.run_in_executor(self._executor, self._run, job_id, request)
            await self._finish(job_id, JobState.COMPLETED, outcome=outcome, request=request)
        except _JobStopped:
            await self._finish(job_id, JobState.CANCELLED, request=request)
        except Sam2ServeError as e:
            await self._finish(job_id, JobState.FAILED, error=e, request=request)
        except (asyncio.CancelledError, redis.RedisError):
            raise  # closing, or Redis gone: the job stays in our running list for requeueing
        except Exception as e:  # a bug: logged with its traceback, reported as INTERNAL
            log.exception("request %s failed", job_id)
            await self._finish(job_id, JobState.FAILED, error=e, request=request)
        finally:
            self._running -= 1
            async with self._idle:
                self._idle.notify_all()

    def _run(self, job_id: str, request: SegmentRequest) -> SegmentOutcome:
        """On a job thread: the runner, with cancellation and progress through the synchronous client."""
        from .amg.generator import Cancelled

        job_key, events = self._key("job", job_id), self._key("events", job_id)

        def should_stop() -> bool:
            return self._sync.hget(job_key, "cancel") == b"1"

        def on_progress(done: int, total: int) -> None:
            with self._sync.pipeline(transaction=True) as pipe:
                pipe.hset(job_key, "progress", repr(done / max(total, 1)))
                pipe.hincrby(job_key, "version", 1)
                pipe.publish(events, "progress")
                pipe.execute()

        def log_line(message: str) -> None:
            with self._sync.pipeline(transaction=True) as pipe:
                pipe.rpush(self._key("logs", job_id), json.dumps([time.time(), message]))
                pipe.expire(self._key("logs", job_id), UNFINISHED_TTL_S)
                pipe.hincrby(job_key, "version", 1)
                pipe.publish(events, "log")
                pipe.execute()

        try:
            return self._runner(request, should_stop, on_progress, log_line)
        except Cancelled:
            raise _JobStopped from None

    async def _finish(self, job_id: str, state: JobState, error: BaseException | None = None,
                      outcome: SegmentOutcome | None = None, request: SegmentRequest | None = None) -> None:
        if request is None:
            data = await self._redis.get(self._key("request", job_id))
            request = jobcodec.decode(data) if data is not None else None
        fields: dict[str, Any] = {"state": state.name, "finished_at": repr(time.time())}
        if error is not None:
            public = isinstance(error, Sam2ServeError)
            fields |= {"error_kind": type(error).__name__ if public else "",
                       "error_message": str(error) if public else INTERNAL_ERROR}
        async with self._redis.pipeline(transaction=True) as pipe:
            if outcome is not None:
                pipe.set(self._key("result", job_id), jobcodec.encode(outcome), ex=self._ttl)
            if request is not None:
                pipe.set(self._key("request", job_id), jobcodec.encode(_without_image(request)), ex=self._ttl)
            pipe.hset(self._key("job", job_id), mapping=fields)
            pipe.hincrby(self._key("job", job_id), "version", 1)
            for kind in ("job", "logs"):
                pipe.expire(self._key(kind, job_id), self._ttl)
            pipe.lrem(self._key("running", self.worker_id), 1, job_id)
            pipe.publish(self._key("events", job_id), state.name)
            await pipe.execute()
        if self._on_finished is not None and request is not None:
            snapshot = await self.status(job_id)
            self._on_finished(Job(id=job_id, request=request, state=state, submitted_at=snapshot.submitted_at,
                                  started_at=snapshot.started_at, finished_at=snapshot.finished_at,
                                  progress=snapshot.progress, error=error, outcome=outcome))

    async def _update(self, job_id: str, fields: dict[str, Any]) -> None:
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.hset(self._key("job", job_id), mapping=fields)
            pipe.hincrby(self._key("job", job_id), "version", 1)
            pipe.publish(self._key("events", job_id), "update")
            await pipe.execute()

    async def _log(self, job_id: str, message: str) -> None:
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.rpush(self._key("logs", job_id), json.dumps([time.time(), message]))
            pipe.expire(self._key("logs", job_id), UNFINISHED_TTL_S)
            pipe.hincrby(self._key("job", job_id), "version", 1)
            pipe.publish(self._key("events", job_id), "log")
            await pipe.execute()

    # -- liveness ----------------------------------------------------------------------------------------
    async def _keep_alive(self) -> None:
        while True:
            await asyncio.sleep(self._heartbeat_s)  # a timer, not a wait for another task
            try:
                await self._beat()
                await self.requeue_lost_jobs()
            except redis.RedisError as e:
                log.warning("job queue: heartbeat failed (%s)", e)

    async def _beat(self) -> None:
        seconds, micros = await self._redis.time()
        await self._redis.zadd(self._key("replicas"), {self.worker_id: seconds + micros / 1e6})

    async def requeue_lost_jobs(self) -> int:
        """Jobs taken by replicas whose heartbeat stopped: back to the front of the queue, or failed after
        MAX_ATTEMPTS runs. Returns how many were found. Any replica may do this; each job moves once."""
        seconds, micros = await self._redis.time()
        lost = await self._redis.zrangebyscore(self._key("replicas"), "-inf",
                                               seconds + micros / 1e6 - self._lost_after_s)
        found = 0
        for worker in lost:
            found += await self._requeue_from(worker.decode())
            await self._redis.zrem(self._key("replicas"), worker)
        return found

    async def _requeue_from(self, worker: str) -> int:
        moved_count = 0
        running = self._key("running", worker)
        while (moved := await self._requeue_one(keys=[running, self._key("pending")],
                                                args=[self._key("job", ""), MAX_ATTEMPTS])) is not None:
            moved_count += 1
            job_id, attempts, requeued = moved[0].decode(), int(moved[1]), bool(moved[2])
            if not requeued:
                await self._finish(job_id, JobState.FAILED, error=errors.JobFailed(
                    f"the replica running this request stopped {attempts} times; it is not retried"))
                continue
            await self._log(job_id, f"the replica running this request ({worker}) stopped; queued again")
            await self._redis.publish(self._key("moved"), job_id)
            log.warning("job queue: requeued %s from replica %s", job_id, worker)
        return moved_count

    def _key(self, *parts: str) -> str:
        return self._prefix + ":".join(parts)


class _JobStopped(Exception):
    pass


def _snapshot(job_id: str, fields: dict[str, str], logs: list[bytes], position: int | None) -> JobSnapshot:
    def time_or_none(name: str) -> float | None:
        return float(fields[name]) if fields.get(name) else None

    error: BaseException | None = None
    if fields.get("error_message"):
        error = _error(fields.get("error_kind", ""), fields["error_message"])
    entries = tuple((float(t), str(m)) for t, m in (json.loads(e) for e in logs))
    return JobSnapshot(job_id, JobState[fields["state"]], position if position is not None else 0,
                       float(fields.get("progress", 0)), entries, error, float(fields["submitted_at"]),
                       time_or_none("started_at"), time_or_none("finished_at"), int(fields.get("version", 0)))


def _error(kind: str, message: str) -> BaseException:
    """Our own error classes come back as themselves (their status code follows); anything else as an
    internal error whose details were never stored."""
    cls = getattr(errors, kind, None)
    if isinstance(cls, type) and issubclass(cls, Sam2ServeError):
        return cls(message)
    return RuntimeError(INTERNAL_ERROR)


def _without_image(request: SegmentRequest) -> SegmentRequest:
    return replace(request, image_value=b"" if isinstance(request.image_value, bytes) else "")
