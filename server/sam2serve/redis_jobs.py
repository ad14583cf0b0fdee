"""A job queue that every replica shares through Redis: any replica accepts, runs, reports on and cancels
any job, so the queue API works behind a load balancer, and jobs queued on a replica that scales down are
run by the others.

Keys, under a prefix (default "sam2serve:"):
    pending             job ids waiting, oldest first; its length is bounded by queue_size for all replicas
    running:<replica>   ids a replica has taken (moved from pending atomically, so a crash leaves them here)
    reaping:<replica>   a lost replica's running list, renamed while its ids are requeued
    replicas            sorted set: each replica's last heartbeat (Redis server time, so pod clocks don't matter)
    job:<id>            hash: state, times, progress, version, owner, error, attempts, cancel flag
    request:<id>        the encoded request (`jobcodec`); the image is dropped when the job ends
    logs:<id>           JSON [time, message] entries
    result:<id>         the encoded outcome
    events:<id>         pub/sub channel: a message whenever the job changes
    moved               pub/sub channel: a message whenever a job leaves `pending` (queue positions move)

Every change of state is one Lua script, so replicas never disagree about a job:
- a replica claims a job only while it is IN_QUEUE, and becomes its `owner`;
- a job ends only if the id is still where the finisher expects it (its running list, or `pending` for a
  cancel in the queue), so a replica that was wrongly declared lost cannot finish a job that was requeued;
- a running job stops at its next decoder batch once its owner changed or a cancel was asked for.
A replica is lost after LOST_AFTER_BEATS missed heartbeats; its jobs go back to the front of the queue once,
and fail if that happens again, so a request that kills replicas cannot kill them all. Ids in a replica's
own running list that it is not running (a reply lost to a network error) are handed back by that replica.
The keys of a finished job expire after result_ttl_s.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, ParamSpec, TypeVar

import redis
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import NoBackoff
from redis.retry import Retry

from . import errors, jobcodec
from .config import without_password
from .errors import JobNotFound, QueueFull, QueueUnavailable, Sam2ServeError, ShuttingDown
from .jobs import (
    CancelOutcome,
    Job,
    JobSnapshot,
    JobState,
    JobStopped,
    Runner,
    raise_unless_completed,
    run_stoppable,
    without_image,
)
from .pipeline import SegmentOutcome, SegmentRequest

log = logging.getLogger(__name__)

LOST_AFTER_BEATS = 3
MAX_ATTEMPTS = 2  # runs of one job; a job whose replica died twice fails
UNFINISHED_TTL_S = 24 * 3600  # keys of a job nobody finishes (every replica gone) are not kept forever
BLOCK_S = 1.0  # a worker's wait for a job between checks of the drain flag
INTERNAL_ERROR = "internal error"

_PUSH_IF_ROOM = """
if redis.call('LLEN', KEYS[1]) >= tonumber(ARGV[1]) then return -1 end
return redis.call('RPUSH', KEYS[1], ARGV[2])
"""
# KEYS: job, events. ARGV: claim token, now. 1 claimed; 0 cancelled before it started; -1 gone; -2 not queued.
_CLAIM = """
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
if redis.call('HGET', KEYS[1], 'state') ~= 'IN_QUEUE' then return -2 end
if redis.call('HGET', KEYS[1], 'cancel') == '1' then return 0 end
redis.call('HSET', KEYS[1], 'state', 'IN_PROGRESS', 'owner', ARGV[1], 'started_at', ARGV[2], 'progress', '0')
redis.call('HINCRBY', KEYS[1], 'version', 1)
redis.call('PUBLISH', KEYS[2], 'IN_PROGRESS')
return 1
"""
# KEYS: job, list the id must be taken from ('' for none), result, request, logs, events.
# ARGV: id, state, finished_at, error_kind, error_message, ttl, result ('' none), request ('' none),
#       claim token the job must still have ('' for none).
# 1 done; 0 someone else owns the job now (nothing changed); -1 gone; -2 already ended.
_FINISH = """
if ARGV[9] ~= '' and redis.call('HGET', KEYS[1], 'owner') ~= ARGV[9] then return 0 end
if KEYS[2] ~= '' and redis.call('LREM', KEYS[2], 1, ARGV[1]) == 0 then return 0 end
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
local state = redis.call('HGET', KEYS[1], 'state')
if state == 'COMPLETED' or state == 'FAILED' or state == 'CANCELLED' then return -2 end
if ARGV[7] ~= '' then redis.call('SET', KEYS[3], ARGV[7], 'EX', ARGV[6]) end
if ARGV[8] ~= '' then redis.call('SET', KEYS[4], ARGV[8], 'EX', ARGV[6]) end
redis.call('HSET', KEYS[1], 'state', ARGV[2], 'finished_at', ARGV[3])
if ARGV[5] ~= '' then redis.call('HSET', KEYS[1], 'error_kind', ARGV[4], 'error_message', ARGV[5]) end
redis.call('HINCRBY', KEYS[1], 'version', 1)
redis.call('EXPIRE', KEYS[1], ARGV[6])
redis.call('EXPIRE', KEYS[5], ARGV[6])
redis.call('PUBLISH', KEYS[6], ARGV[2])
return 1
"""
# Back to the front of the queue from a running list. KEYS: running list, pending, job, events.
# ARGV: id ('' = the list's last), count the run as an attempt ('1'/'0'), max attempts, now.
# Returns {id, attempts, requeued (1) or failed (0)}, or nil when there was no such id.
_REQUEUE = """
local id = ARGV[1]
if id == '' then id = redis.call('RPOP', KEYS[1]) if not id then return nil end
elseif redis.call('LREM', KEYS[1], 1, id) == 0 then return nil end
local job = KEYS[3] .. id
if redis.call('EXISTS', job) == 0 then return {id, 0, 0} end
local attempts = tonumber(redis.call('HGET', job, 'attempts') or '0')
if ARGV[2] == '1' then attempts = redis.call('HINCRBY', job, 'attempts', 1) end
redis.call('HINCRBY', job, 'version', 1)
if attempts >= tonumber(ARGV[3]) then
  redis.call('HSET', job, 'state', 'FAILED', 'finished_at', ARGV[4], 'error_kind', 'JobFailed',
             'error_message', 'the replica running this request stopped ' .. attempts .. ' times; it is not retried')
  redis.call('PUBLISH', KEYS[4] .. id, 'FAILED')
  return {id, attempts, 0}
end
redis.call('HSET', job, 'state', 'IN_QUEUE', 'progress', '0', 'owner', '')
redis.call('LPUSH', KEYS[2], id)
redis.call('PUBLISH', KEYS[4] .. id, 'IN_QUEUE')
return {id, attempts, 1}
"""

# A lost replica's running list is renamed before its ids are requeued, so that if the replica is in fact
# alive, the jobs it takes meanwhile (into a new running list) are not requeued with the old ones. A list
# left half-reaped by a reaper that died is finished first. KEYS: running, reaping. 1: something to reap.
_STAGE_FOR_REAPING = """
if redis.call('EXISTS', KEYS[2]) == 1 then return 1 end
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('RENAME', KEYS[1], KEYS[2])
return 1
"""

P = ParamSpec("P")
T = TypeVar("T")


def _redis_errors_unavailable(method: Callable[P, Awaitable[T]]) -> Callable[P, Awaitable[T]]:
    """Public calls answer UNAVAILABLE (with no address in the message) while Redis is unreachable."""

    @functools.wraps(method)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return await method(*args, **kwargs)
        except redis.RedisError as e:
            log.warning("job queue: Redis error in %s: %s", method.__name__, e)
            raise QueueUnavailable("the job queue's store is unreachable; retry later") from None

    return wrapper


class RedisJobQueue:
    shared = True

    def __init__(self, runner: Runner, url: str, workers: int = 1, queue_size: int = 32,
                 result_ttl_s: float = 600.0, prefix: str = "sam2serve:",
                 on_finished: Callable[[Job], None] | None = None, heartbeat_s: float = 5.0,
                 watch_poll_s: float = 5.0, max_connections: int = 1024) -> None:
        self._runner, self._url, self._workers = runner, url, workers
        self._queue_size, self._ttl = queue_size, max(1, int(result_ttl_s))
        self._prefix, self._on_finished = prefix, on_finished
        self._heartbeat_s, self._watch_poll_s = heartbeat_s, watch_poll_s
        self._lost_after_s = LOST_AFTER_BEATS * heartbeat_s
        self.replica_id = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        # Every watcher holds a pub/sub connection; the socket timeout outlasts a worker's blocking wait,
        # so that a half-open connection fails instead of hanging.
        options: dict[str, Any] = {"socket_timeout": BLOCK_S + 10.0, "socket_connect_timeout": 10.0,
                                   "health_check_interval": 30}
        if not url.startswith("unix:"):
            options["socket_keepalive"] = True
        # No automatic retries: a script whose reply was lost must not run twice. What a lost reply leaves
        # behind (an id in a running list) is handed back by reconciliation.
        self._redis = aioredis.Redis.from_url(url, max_connections=max_connections,
                                              retry=AsyncRetry(NoBackoff(), 0), **options)
        self._beats = aioredis.Redis.from_url(url, max_connections=4, retry=AsyncRetry(NoBackoff(), 0),
                                              **options)  # never starved by watchers
        self._sync = redis.Redis.from_url(url, retry=Retry(NoBackoff(), 0), **options)  # job threads, scrapes
        self._push = self._redis.register_script(_PUSH_IF_ROOM)
        self._claim = self._redis.register_script(_CLAIM)
        self._finish_script = self._redis.register_script(_FINISH)
        self._requeue = self._beats.register_script(_REQUEUE)
        self._stage = self._beats.register_script(_STAGE_FOR_REAPING)
        # workers=0: a replica that accepts and answers but runs nothing (the others do)
        self._executor = ThreadPoolExecutor(max_workers=max(workers, 1), thread_name_prefix="sam2serve-job")
        self._accepting = True
        self._stopping = threading.Event()  # closing: running jobs stop and are handed back
        self._in_flight: collections.Counter[str] = collections.Counter()  # job id → claims running here
        self._running = 0  # the same count as a plain int, for metrics scrapes on another thread
        self._last_share = 0.0
        self._orphan_suspects: set[str] = set()
        self._idle = asyncio.Condition()
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        """Check the connection (a clear error at startup beats one per request), then start working."""
        try:
            await self._redis.ping()
            await self._beat()
        except redis.RedisError as e:
            raise QueueUnavailable(f"cannot reach the queue's Redis at {without_password(self._url)}: {e}") from e
        self._tasks = [asyncio.create_task(self._work(), name=f"sam2serve-redis-worker-{i}")
                       for i in range(self._workers)]
        self._tasks.append(asyncio.create_task(self._keep_alive(), name="sam2serve-redis-heartbeat"))
        log.info("job queue: Redis at %s, prefix %r, replica %s", without_password(self._url), self._prefix,
                 self.replica_id)

    # -- submitting and reading --------------------------------------------------------------------------
    @_redis_errors_unavailable
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

    @_redis_errors_unavailable
    async def status(self, job_id: str) -> JobSnapshot:
        async with self._redis.pipeline(transaction=True) as pipe:  # one consistent view
            pipe.hgetall(self._key("job", job_id))
            pipe.lrange(self._key("logs", job_id), 0, -1)
            pipe.lpos(self._key("pending"), job_id)
            fields, logs, position = await pipe.execute()
        fields = {k.decode(): v.decode() for k, v in fields.items()}
        if "state" not in fields or "submitted_at" not in fields:
            raise JobNotFound(f"no request with id {job_id!r} (unknown, or its result expired)")
        return _snapshot(job_id, fields, logs, position)

    @_redis_errors_unavailable
    async def request(self, job_id: str) -> SegmentRequest:
        """The request as submitted, without its image once the job has finished."""
        data = await self._redis.get(self._key("request", job_id))
        if data is None:
            raise JobNotFound(f"no request with id {job_id!r} (unknown, or its result expired)")
        return jobcodec.decode(data)

    @_redis_errors_unavailable
    async def result(self, job_id: str) -> SegmentOutcome:
        snapshot = await self.status(job_id)
        raise_unless_completed(job_id, snapshot.state, snapshot.error)
        data = await self._redis.get(self._key("result", job_id))
        if data is None:
            raise JobNotFound(f"the result of request {job_id!r} expired")
        return jobcodec.decode(data)

    async def watch(self, job_id: str) -> AsyncIterator[JobSnapshot]:
        """The current state, then every change (queue position included), ending with a terminal state."""
        try:
            pubsub = self._redis.pubsub()
            try:
                channels = (self._key("events", job_id), self._key("moved"))
                await pubsub.subscribe(*channels)
                for _ in channels:  # confirmed: no change made after this point can be missed
                    await pubsub.get_message(timeout=self._watch_poll_s)
                seen: tuple[int, int] | None = None
                while True:
                    snapshot = await self.status(job_id)
                    if (snapshot.version, snapshot.queue_position) != seen:
                        seen = (snapshot.version, snapshot.queue_position)
                        yield snapshot
                    if snapshot.state.terminal:
                        return
                    # Wakes on the next change; the timeout re-reads in case Redis dropped a message.
                    await pubsub.get_message(ignore_subscribe_messages=True, timeout=self._watch_poll_s)
            finally:
                await pubsub.aclose()
        except redis.RedisError as e:
            log.warning("job queue: Redis error while watching %s: %s", job_id, e)
            raise QueueUnavailable("the job queue's store is unreachable; retry later") from None

    async def wait(self, job_id: str) -> JobSnapshot:
        async with contextlib.aclosing(self.watch(job_id)) as snapshots:
            async for snapshot in snapshots:
                if snapshot.state.terminal:
                    return snapshot
        raise AssertionError("watch ends with a terminal state")

    @_redis_errors_unavailable
    async def cancel(self, job_id: str) -> tuple[CancelOutcome, JobSnapshot]:
        snapshot = await self.status(job_id)
        if not snapshot.state.terminal:
            await self._redis.hset(self._key("job", job_id), "cancel", 1)  # checked at every decoder batch
            if await self._finish(job_id, JobState.CANCELLED, taken_from=self._key("pending")):
                await self._redis.publish(self._key("moved"), job_id)
                return CancelOutcome.CANCELLED_IN_QUEUE, await self.status(job_id)
            snapshot = await self.status(job_id)
            if snapshot.state is JobState.IN_PROGRESS:
                await self._log(job_id, "cancellation requested; stopping at the next decoder batch")
                return CancelOutcome.CANCELLING_IN_PROGRESS, await self.status(job_id)
            if snapshot.state is JobState.IN_QUEUE:  # taken by a worker that is about to see the flag
                return CancelOutcome.CANCELLING_IN_PROGRESS, snapshot
        if snapshot.state is JobState.CANCELLED:
            return CancelOutcome.ALREADY_CANCELLED, snapshot
        return CancelOutcome.ALREADY_FINISHED, snapshot

    def depth(self) -> tuple[float, int]:
        """(this replica's share of the shared queue, jobs running here). The share is waiting jobs over live
        replicas, so that an autoscaler averaging the per-pod values sees the total over the pod count, as
        with per-pod queues. Called from metrics scrapes, off the event loop; while Redis is unreachable it
        repeats the last value (a negative or missing one would make an autoscaler act on nothing)."""
        try:
            seconds, micros = self._sync.time()
            with self._sync.pipeline(transaction=False) as pipe:
                pipe.llen(self._key("pending"))
                pipe.zcount(self._key("replicas"), seconds + micros / 1e6 - self._lost_after_s, "+inf")
                waiting, live = pipe.execute()
            self._last_share = int(waiting) / max(int(live), 1)
        except redis.RedisError:
            log.warning("job queue: Redis unreachable for a metrics scrape; repeating the last queue depth")
        return self._last_share, self._running

    async def drain(self, timeout_s: float) -> bool:
        """Stop accepting and taking jobs; wait until the running ones finish. Queued jobs stay in Redis for
        the other replicas (or this one's successor)."""
        self._accepting = False
        try:
            async with asyncio.timeout(timeout_s), self._idle:
                await self._idle.wait_for(lambda: not self._in_flight)
            return True
        except TimeoutError:
            return False

    async def close(self) -> None:
        """Stop; jobs still running (a drain that timed out) stop at their next batch and go back to the
        front of the queue without counting as an attempt."""
        self._accepting = False
        self._stopping.set()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._executor.shutdown(wait=False, cancel_futures=True)
        with contextlib.suppress(redis.RedisError):  # else the others requeue them when this replica is lost
            await self._hand_back_all()
            await self._beats.zrem(self._key("replicas"), self.replica_id)
        for client in (self._redis, self._beats):
            await client.aclose()
        self._sync.close()

    # -- working -----------------------------------------------------------------------------------------
    async def _work(self) -> None:
        pending, mine = self._key("pending"), self._key("running", self.replica_id)
        while self._accepting:
            try:
                raw = await self._redis.blmove(pending, mine, BLOCK_S, "LEFT", "RIGHT")
                if raw is None:
                    continue
                job_id = raw.decode()
                self._in_flight[job_id] += 1
                self._running += 1
                try:
                    if not self._accepting:  # drain began while waiting: hand it back at the front
                        await self._hand_back(mine, job_id)
                        return
                    await self._redis.publish(self._key("moved"), job_id)
                    await self._run_job(job_id)
                finally:
                    self._running -= 1
                    self._in_flight[job_id] -= 1
                    if self._in_flight[job_id] <= 0:
                        del self._in_flight[job_id]
                    async with self._idle:
                        self._idle.notify_all()
            except asyncio.CancelledError:
                raise
            except (redis.RedisError, QueueUnavailable) as e:  # the job stays listed; reconciliation hands it back
                log.warning("job queue: Redis error in a worker (%s); retrying", e)
                await asyncio.sleep(self._heartbeat_s)  # back off; the pool reconnects
            except Exception:
                log.exception("job queue: worker error; continuing")

    async def _run_job(self, job_id: str) -> None:
        token = f"{self.replica_id}:{uuid.uuid4().hex[:12]}"  # this claim, not just this replica
        claimed = await self._claim(keys=[self._key("job", job_id), self._key("events", job_id)],
                                    args=[token, repr(time.time())])
        mine = self._key("running", self.replica_id)
        if claimed == 0:
            await self._finish(job_id, JobState.CANCELLED, taken_from=mine)
            return
        if claimed < 0:  # expired, or already handled (e.g. a retried submit pushed it twice)
            await self._redis.lrem(mine, 1, job_id)
            return
        request: SegmentRequest | None = None
        try:
            request = await self.request(job_id)
            outcome = await asyncio.get_running_loop().run_in_executor(self._executor, self._run, job_id, token,
                                                                       request)
            await self._finish(job_id, JobState.COMPLETED, taken_from=mine, token=token, outcome=outcome,
                               request=request)
        except JobStopped:
            if not self._stopping.is_set():  # cancelled, or taken over; a closing replica hands it back
                await self._finish(job_id, JobState.CANCELLED, taken_from=mine, token=token, request=request)
        except (asyncio.CancelledError, redis.RedisError, QueueUnavailable):
            raise  # closing, or Redis unreachable: the job stays listed and is handed back
        except Sam2ServeError as e:
            await self._finish(job_id, JobState.FAILED, taken_from=mine, token=token, error=e, request=request)
        except Exception as e:  # a bug, or a request this version cannot read: logged, reported as INTERNAL
            log.exception("request %s failed", job_id)
            await self._finish(job_id, JobState.FAILED, taken_from=mine, token=token, error=e, request=request)

    def _run(self, job_id: str, token: str, request: SegmentRequest) -> SegmentOutcome:
        """On a job thread: the runner, with cancellation and progress through the synchronous client."""
        job_key, events = self._key("job", job_id), self._key("events", job_id)

        def should_stop() -> bool:
            if self._stopping.is_set():
                return True
            cancel, owner = self._sync.hmget(job_key, ["cancel", "owner"])
            return cancel == b"1" or owner != token.encode()  # cancelled, or no longer this claim's

        def on_progress(done: int, total: int) -> None:
            if not self._stopping.is_set():
                with self._sync.pipeline(transaction=True) as pipe:
                    pipe.hset(job_key, "progress", repr(done / max(total, 1)))
                    pipe.hincrby(job_key, "version", 1)
                    pipe.publish(events, "progress")
                    pipe.execute()

        def log_line(message: str) -> None:
            if not self._stopping.is_set():
                with self._sync.pipeline(transaction=True) as pipe:
                    self._queue_log_entry(pipe, job_id, message)
                    pipe.execute()

        return run_stoppable(self._runner, request, should_stop, on_progress, log_line)

    async def _finish(self, job_id: str, state: JobState, taken_from: str = "", token: str = "",
                      error: BaseException | None = None, outcome: SegmentOutcome | None = None,
                      request: SegmentRequest | None = None) -> bool:
        """End the job, if `job_id` can still be taken from the list `taken_from` ('' for none) and (with a
        `token`) the job is still that claim's. False when another claim owns it, or it had already ended."""
        if request is None:
            request = await self._stored_request(job_id)
        kind, message = "", ""
        if error is not None:
            public = isinstance(error, Sam2ServeError)
            kind = type(error).__name__ if public else ""
            message = (str(error) or type(error).__name__) if public else INTERNAL_ERROR
        done = await self._finish_script(
            keys=[self._key("job", job_id), taken_from, self._key("result", job_id), self._key("request", job_id),
                  self._key("logs", job_id), self._key("events", job_id)],
            args=[job_id, state.name, repr(time.time()), kind, message, self._ttl,
                  jobcodec.encode(outcome) if outcome is not None else b"",
                  jobcodec.encode(without_image(request)) if request is not None else b"", token])
        if done != 1:
            if done == 0 and token:
                log.warning("job queue: %s was taken over by another claim; its %s here is dropped", job_id,
                            state.name)
            return False
        await self._finished_hook(job_id, state, request, error, outcome)
        return True

    async def _stored_request(self, job_id: str) -> SegmentRequest | None:
        data = await self._redis.get(self._key("request", job_id))
        try:
            return jobcodec.decode(data) if data is not None else None
        except jobcodec.CodecError:
            return None

    async def _finished_hook(self, job_id: str, state: JobState, request: SegmentRequest | None,
                             error: BaseException | None, outcome: SegmentOutcome | None) -> None:
        """Metrics and webhooks for a job this replica ended."""
        if self._on_finished is None or request is None:
            return
        try:
            times = await self._redis.hmget(self._key("job", job_id), ["submitted_at", "started_at", "finished_at"])
            submitted, started, finished = (float(t) if t else None for t in times)
            self._on_finished(Job(id=job_id, request=request, state=state, submitted_at=submitted or time.time(),
                                  started_at=started, finished_at=finished, error=error, outcome=outcome))
        except Exception:
            log.exception("job queue: on_finished hook failed for %s", job_id)

    async def _log(self, job_id: str, message: str) -> None:
        async with self._redis.pipeline(transaction=True) as pipe:
            self._queue_log_entry(pipe, job_id, message)
            await pipe.execute()

    def _queue_log_entry(self, pipe: Any, job_id: str, message: str) -> None:
        """Add a log entry's commands to a pipeline (sync or async: queueing commands is the same)."""
        pipe.rpush(self._key("logs", job_id), json.dumps([time.time(), message]))
        pipe.expire(self._key("logs", job_id), UNFINISHED_TTL_S)
        pipe.hincrby(self._key("job", job_id), "version", 1)
        pipe.publish(self._key("events", job_id), "log")

    # -- liveness ----------------------------------------------------------------------------------------
    async def _keep_alive(self) -> None:
        while True:
            await asyncio.sleep(self._heartbeat_s)  # a timer, not a wait for another task
            try:
                await self._beat()
                await self.requeue_lost_jobs()
                await self._hand_back_orphans()
            except asyncio.CancelledError:
                raise
            except Exception as e:  # the heartbeat must outlive any one failure
                log.warning("job queue: heartbeat round failed (%s)", e)

    async def _beat(self) -> None:
        seconds, micros = await self._beats.time()
        await self._beats.zadd(self._key("replicas"), {self.replica_id: seconds + micros / 1e6})

    async def requeue_lost_jobs(self) -> int:
        """Jobs taken by replicas whose heartbeat stopped: back to the front of the queue, or failed after
        MAX_ATTEMPTS runs. Returns how many were found. Any replica may do this; each job moves once."""
        seconds, micros = await self._beats.time()
        cutoff = seconds + micros / 1e6 - self._lost_after_s
        found = 0
        for raw, score in await self._beats.zrangebyscore(self._key("replicas"), "-inf", cutoff, withscores=True):
            replica = raw.decode()
            if await self._beats.zscore(self._key("replicas"), replica) != score:
                continue  # it beat (or was handled) meanwhile
            reaping = self._key("reaping", replica)
            if await self._stage(keys=[self._key("running", replica), reaping]):
                found += await self._requeue_all(reaping, replica, count_attempt=True)
            # Forget it only if it did not beat meanwhile (a live replica keeps its entry).
            async with self._beats.pipeline(transaction=True) as pipe:
                await pipe.watch(self._key("replicas"))
                if await pipe.zscore(self._key("replicas"), replica) == score:
                    pipe.multi()
                    pipe.zrem(self._key("replicas"), replica)
                    with contextlib.suppress(redis.WatchError):
                        await pipe.execute()
        return found

    async def _hand_back_orphans(self) -> None:
        """Ids in this replica's running list that it is not running (a BLMOVE reply lost to a network error,
        or a Redis error before the job ended) go back to the queue. Only ids found so in two rounds in a row:
        one in the list but not yet in `_in_flight` may just be a BLMOVE whose reply is on its way."""
        mine = self._key("running", self.replica_id)
        listed = {raw.decode() for raw in await self._beats.lrange(mine, 0, -1)} - set(self._in_flight)
        suspects, self._orphan_suspects = self._orphan_suspects, listed
        for job_id in listed & suspects:
            if job_id not in self._in_flight:
                await self._hand_back(mine, job_id)
                log.warning("job queue: handed back %s, which this replica had listed but was not running", job_id)

    async def _hand_back_all(self) -> int:
        return await self._requeue_all(self._key("running", self.replica_id), self.replica_id, count_attempt=False)

    async def _requeue_all(self, source: str, replica: str, count_attempt: bool) -> int:
        moved = 0
        while (result := await self._requeue(keys=self._requeue_keys(source),
                                             args=["", "1" if count_attempt else "0", MAX_ATTEMPTS,
                                                   repr(time.time())])) is not None:
            moved += 1
            job_id, requeued = result[0].decode(), bool(result[2])
            if requeued:
                await self._log(job_id, f"the replica running this request ({replica}) stopped; queued again")
                await self._beats.publish(self._key("moved"), job_id)
            else:
                await self._after_failing_lost(job_id)
            log.warning("job queue: %s %s from replica %s", "requeued" if requeued else "failed", job_id, replica)
        return moved

    async def _after_failing_lost(self, job_id: str) -> None:
        """A job the requeue script failed: keep it only as long as finished jobs, without its image."""
        request = await self._stored_request(job_id)
        async with self._redis.pipeline(transaction=True) as pipe:
            if request is not None:
                pipe.set(self._key("request", job_id), jobcodec.encode(without_image(request)), ex=self._ttl)
            for kind in ("job", "logs"):
                pipe.expire(self._key(kind, job_id), self._ttl)
            await pipe.execute()
        snapshot = await self.status(job_id)
        await self._finished_hook(job_id, JobState.FAILED, request, snapshot.error, None)

    async def _hand_back(self, running: str, job_id: str) -> None:
        """`job_id` from `running` to the front of the queue, not counted as an attempt."""
        await self._requeue(keys=self._requeue_keys(running), args=[job_id, "0", MAX_ATTEMPTS, repr(time.time())])

    def _requeue_keys(self, running: str) -> list[str]:
        return [running, self._key("pending"), self._key("job", ""), self._key("events", "")]

    def _key(self, *parts: str) -> str:
        return self._prefix + ":".join(parts)


def _snapshot(job_id: str, fields: dict[str, str], logs: list[bytes], position: int | None) -> JobSnapshot:
    def time_or_none(name: str) -> float | None:
        return float(fields[name]) if fields.get(name) else None

    error: BaseException | None = None
    if fields.get("state") == JobState.FAILED.name:
        error = _error(fields.get("error_kind", ""), fields.get("error_message") or INTERNAL_ERROR)
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
