"""Jobs that every replica shares through Redis: any replica accepts, runs, reports on and cancels any job,
so the queue API works behind a load balancer, and jobs queued on a replica that scales down are run by the
others.

Keys, under a prefix (default "sam2serve:"):
    pending             job ids waiting, oldest first; its length is bounded by queue_size for all replicas
    running:<replica>   ids a replica has taken (moved from pending atomically, so a crash leaves them here)
    reaping:<replica>   a lost replica's running list, renamed while its ids are requeued
    replicas            sorted set: each replica's last heartbeat (Redis server time, so pod clocks don't matter)
    job:<id>            hash: state, times, progress, version, owner (the claim's token), error, attempts, cancel,
                        image_bytes, url (1: its image is a URL, for the fetch stage to claim), tenant (whose
                        request it is)
    request:<id>        the encoded request (`jobcodec`); the image is dropped when the job ends
    logs:<id>           JSON [time, message] entries
    result:<id>         the encoded outcome
    events:<id>         pub/sub channel: a message whenever the job changes
    moved               pub/sub channel: a message whenever a job leaves `pending` (queue positions move)
    queued              pub/sub channel: a message whenever a job enters `pending` (wakes claims of one kind)

Every change of a job is one Lua script, and the scripts check `model.TRANSITIONS` (passed in as a Lua
table), so replicas never disagree about a job:
- a replica claims a job only while it is IN_QUEUE, and its claim's token becomes the job's `owner`;
- progress, log lines and the end of a run are written only while the job is IN_PROGRESS under that owner,
  and a job ends only if its id is still where the finisher expects it (its running list, or `pending` for
  a cancel in the queue): a replica wrongly declared lost cannot touch a job that was requeued;
- a running job stops at its next decoder batch once its owner changed or a cancel was asked for.
A replica is lost after LOST_AFTER_BEATS missed heartbeats; its jobs go back to the front of the queue once,
and fail if that happens again, so a request that kills replicas cannot kill them all. Ids in a replica's
own running list that it is not running (a reply lost to a network error) are handed back by that replica.
The keys of a finished job expire after result_ttl_s.

Faults: a command whose connection broke (Redis restarted) reconnects and runs again (redis-py's Retry), so
every script is safe to run twice: Submit finds the job it made, a claim its token, a finish its nonce. The
heartbeat tells whether Redis answers (`reachable`: health follows it). Status watchers share one pub/sub
connection per replica (`redis_events.JobEvents`). What survives a restart of Redis is what its persistence
keeps (README, "Redis: outages, restarts and persistence").

Redis Streams (XREADGROUP / XAUTOCLAIM) were weighed against these lists: they would replace the running
lists and the reaping, but not the fencing (XACK does not check who acks), a bound on waiting jobs, queue
positions, or putting a lost job back at the front as IN_QUEUE; so the lists stay.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import json
import logging
import math
import os
import socket
import time
import uuid
from collections.abc import AsyncGenerator, Callable, Coroutine
from typing import Any, ParamSpec, TypeVar, cast

import redis
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import ExponentialWithJitterBackoff
from redis.retry import Retry

from .. import jobcodec
from ..config import without_password
from ..domain import SegmentOutcome, SegmentRequest
from ..errors import JobNotFound, QueueUnavailable
from .model import (
    CANCELLING_MESSAGE,
    CancelOutcome,
    JobFinished,
    JobResult,
    JobSnapshot,
    JobState,
    error_from,
    image_size,
    lua_transitions,
    new_id,
    not_found,
    queue_bytes_full,
    queue_full,
    raise_unless_completed,
    result_expired,
    stored_error,
)
from .redis_events import JobEvents, stop_tasks
from .store import Claim, FinishedListener

log = logging.getLogger(__name__)

LOST_AFTER_BEATS = 3
MAX_ATTEMPTS = 2  # runs of one job; a job whose replica died twice fails
UNFINISHED_TTL_S = 24 * 3600  # keys of a job nobody finishes (every replica gone) are not kept forever
SOCKET_SLACK_S = 10.0  # a socket's timeout beyond the longest blocking wait, so a half-open one fails
HEALTH_CHECK_S = 5  # a pooled connection idle this long is checked (PING) before use
RETRIES = 4  # of a command whose connection failed: ≈ 0.05 + 0.1 + 0.2 + 0.4 s of backoff (with jitter)
RECONNECT_S = 1.0
KIND_POLL_S = 1.0  # a claim of one kind looks again this often even without a `queued` message (one lost)

_ALLOWED = f"local allowed = {lua_transitions()}\n"
# A new job, queued in one step (so Submit's answer never depends on a later read), and safe to run twice (a
# retry after a lost reply finds the job it made). KEYS: pending, job key prefix, job, request, queued channel.
# ARGV: queue size, id, image byte budget (0: none), this image's bytes, submitted_at, encoded request, ttl,
#       url (1: the image is a URL), tenant.
# {1, length} queued; {-1} queue full; {-2, bytes held} the waiting jobs' images leave no room for this one.
_ADD = """
if redis.call('EXISTS', KEYS[3]) == 1 then
  local at = redis.call('LPOS', KEYS[1], ARGV[2])
  return {1, (at or 0) + 1}
end
if redis.call('LLEN', KEYS[1]) >= tonumber(ARGV[1]) then return {-1} end
local budget = tonumber(ARGV[3])
if budget > 0 then
  local held = 0
  for _, id in ipairs(redis.call('LRANGE', KEYS[1], 0, -1)) do
    held = held + tonumber(redis.call('HGET', KEYS[2] .. id, 'image_bytes') or '0')
  end
  if held + tonumber(ARGV[4]) > budget then return {-2, held} end
end
redis.call('HSET', KEYS[3], 'state', 'IN_QUEUE', 'version', 1, 'submitted_at', ARGV[5], 'progress', 0,
           'attempts', 0, 'image_bytes', ARGV[4], 'url', ARGV[8], 'tenant', ARGV[9])
redis.call('SET', KEYS[4], ARGV[6], 'EX', ARGV[7])
redis.call('EXPIRE', KEYS[3], ARGV[7])
local length = redis.call('RPUSH', KEYS[1], ARGV[2])
redis.call('PUBLISH', KEYS[5], ARGV[2])
return {1, length}
"""
# The first waiting id whose image is (ARGV[1] '1') or is not ('0') a URL, moved to a running list.
# KEYS: pending, running list, job key prefix. The queue is bounded by queue_size: the scan is short.
_TAKE_KIND = """
for _, id in ipairs(redis.call('LRANGE', KEYS[1], 0, -1)) do
  if (redis.call('HGET', KEYS[3] .. id, 'url') == '1') == (ARGV[1] == '1') then
    redis.call('LREM', KEYS[1], 1, id)
    redis.call('RPUSH', KEYS[2], id)
    return id
  end
end
return false
"""
# KEYS: job, events. ARGV: claim token, now. 1 claimed; 0 cancelled before it started; -1 gone; -2 not queued.
# Run twice with one token (a retry after a lost reply), the second run finds the claim made.
_CLAIM = _ALLOWED + """
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
if redis.call('HGET', KEYS[1], 'owner') == ARGV[1] and redis.call('HGET', KEYS[1], 'state') == 'IN_PROGRESS' then
  return 1
end
if not allowed[redis.call('HGET', KEYS[1], 'state')]['IN_PROGRESS'] then return -2 end
if redis.call('HGET', KEYS[1], 'cancel') == '1' then return 0 end
redis.call('HSET', KEYS[1], 'state', 'IN_PROGRESS', 'owner', ARGV[1], 'started_at', ARGV[2], 'progress', '0')
redis.call('HINCRBY', KEYS[1], 'version', 1)
redis.call('PUBLISH', KEYS[2], 'IN_PROGRESS')
return 1
"""
# KEYS: job, list the id must be taken from ('' for none), result, request, logs, events.
# ARGV: id, state, finished_at, error_kind, error_message, ttl, result ('' none), request ('' none),
#       claim token the job must still have ('' for none), this call's nonce.
# 1 done (also when this call's nonce ended it already: a retry after a lost reply); 0 someone else owns the
# job now (nothing changed); -1 gone; -2 already ended.
_FINISH = _ALLOWED + """
if redis.call('HGET', KEYS[1], 'ended_by') == ARGV[10] then return 1 end
if ARGV[9] ~= '' and redis.call('HGET', KEYS[1], 'owner') ~= ARGV[9] then return 0 end
if KEYS[2] ~= '' and redis.call('LREM', KEYS[2], 1, ARGV[1]) == 0 then return 0 end
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
if not allowed[redis.call('HGET', KEYS[1], 'state')][ARGV[2]] then return -2 end
if ARGV[7] ~= '' then redis.call('SET', KEYS[3], ARGV[7], 'EX', ARGV[6]) end
if ARGV[8] ~= '' then redis.call('SET', KEYS[4], ARGV[8], 'EX', ARGV[6]) end
redis.call('HSET', KEYS[1], 'state', ARGV[2], 'finished_at', ARGV[3], 'ended_by', ARGV[10])
if ARGV[5] ~= '' then redis.call('HSET', KEYS[1], 'error_kind', ARGV[4], 'error_message', ARGV[5]) end
redis.call('HINCRBY', KEYS[1], 'version', 1)
redis.call('EXPIRE', KEYS[1], ARGV[6])
redis.call('EXPIRE', KEYS[5], ARGV[6])
redis.call('PUBLISH', KEYS[6], ARGV[2])
return 1
"""
# A running claim's progress or log line, only while it still holds the job. KEYS: job, events, logs ('' for
# progress). ARGV: claim token, progress or log entry, logs ttl. 1 written; 0 the claim lost the job.
_CLAIM_WRITE = """
if redis.call('HGET', KEYS[1], 'owner') ~= ARGV[1] or redis.call('HGET', KEYS[1], 'state') ~= 'IN_PROGRESS' then
  return 0
end
if KEYS[3] == '' then
  redis.call('HSET', KEYS[1], 'progress', ARGV[2])
else
  redis.call('RPUSH', KEYS[3], ARGV[2])
  redis.call('EXPIRE', KEYS[3], ARGV[3])
end
redis.call('HINCRBY', KEYS[1], 'version', 1)
redis.call('PUBLISH', KEYS[2], KEYS[3] == '' and 'progress' or 'log')
return 1
"""
# Back to the front of the queue from a running list. KEYS: running list, pending, job, events.
# ARGV: id ('' = the list's last), count the run as an attempt ('1'/'0'), max attempts, now.
# Returns {id, attempts, 1 requeued | 0 failed | -1 dropped (it had ended)}, or nil when there was no such id.
_REQUEUE = _ALLOWED + """
local id = ARGV[1]
if id == '' then id = redis.call('RPOP', KEYS[1]) if not id then return nil end
elseif redis.call('LREM', KEYS[1], 1, id) == 0 then return nil end
local job = KEYS[3] .. id
if redis.call('EXISTS', job) == 0 then return {id, 0, -1} end
local state = redis.call('HGET', job, 'state')
local attempts = tonumber(redis.call('HGET', job, 'attempts') or '0')
if state == 'IN_QUEUE' then  -- taken from pending but never claimed: back as it was
  redis.call('HINCRBY', job, 'version', 1)
  redis.call('LPUSH', KEYS[2], id)
  redis.call('PUBLISH', KEYS[4] .. id, 'IN_QUEUE')
  return {id, attempts, 1}
end
if not allowed[state]['IN_QUEUE'] then return {id, attempts, -1} end
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


def _retry(sync: bool = False) -> Any:
    """redis-py's own retry: on ConnectionError and TimeoutError, reconnect and run the command again."""
    backoff = ExponentialWithJitterBackoff(cap=1.0, base=0.05)
    return Retry(backoff, RETRIES) if sync else AsyncRetry(backoff, RETRIES)


def _unavailable() -> QueueUnavailable:
    return QueueUnavailable("the job queue's store is unreachable; retry later")


def _redis_errors_unavailable(method: Callable[P, Coroutine[Any, Any, T]]) -> Callable[P, Coroutine[Any, Any, T]]:
    """Public calls answer UNAVAILABLE (with no address in the message) while Redis is unreachable."""

    @functools.wraps(method)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return await method(*args, **kwargs)
        except redis.RedisError as e:
            log.warning("job queue: Redis error in %s: %s", method.__name__, e)
            raise _unavailable() from None

    return wrapper


class RedisJobStore:
    shared = True

    def __init__(self, url: str, queue_size: int = 32, result_ttl_s: float = 600.0, prefix: str = "sam2serve:",
                 on_finished: FinishedListener | None = None, heartbeat_s: float = 5.0, watch_poll_s: float = 5.0,
                 max_connections: int = 1024, longest_wait_s: float = 1.0, queue_bytes: int = 0) -> None:
        self._url, self._queue_size, self._ttl = url, queue_size, max(1, int(result_ttl_s))
        self._queue_bytes = queue_bytes  # images held by waiting jobs, all replicas together; 0: no budget
        self._prefix, self._on_finished = prefix, on_finished
        self._heartbeat_s, self._watch_poll_s = heartbeat_s, watch_poll_s
        self._lost_after_s = LOST_AFTER_BEATS * heartbeat_s
        self.replica_id = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        # The socket timeout outlasts a worker's blocking wait; a pooled connection idle for longer than the
        # health check interval is PINGed before it is used.
        options: dict[str, Any] = {"socket_timeout": longest_wait_s + SOCKET_SLACK_S,
                                   "socket_connect_timeout": 10.0, "health_check_interval": HEALTH_CHECK_S}
        if not url.startswith("unix:"):
            options["socket_keepalive"] = True
        # A command that fails on a broken connection (a pooled one Redis closed when it restarted) reconnects
        # and runs again, with backoff: every script is safe to run twice (a lost reply), so the calls after
        # Redis is back succeed at their first try. The callers' pool waits for a free connection instead of
        # failing with "Too many connections" (status watchers share one pub/sub connection, `JobEvents`).
        self._closing = False
        self._redis = aioredis.Redis.from_pool(aioredis.BlockingConnectionPool.from_url(
            url, max_connections=max_connections, timeout=longest_wait_s + SOCKET_SLACK_S, retry=_retry(), **options))
        self._beats = aioredis.Redis.from_url(url, max_connections=4, retry=_retry(), **options)  # never starved
        self._sync = redis.Redis.from_url(url, retry=_retry(sync=True), **options)  # job threads, scrapes
        self._events = JobEvents(self._redis, self._key("moved"))
        self._add_script = self._redis.register_script(_ADD)
        self._claim_script = self._redis.register_script(_CLAIM)
        self._take_kind = self._redis.register_script(_TAKE_KIND)
        self._finish_script = self._redis.register_script(_FINISH)
        self._requeue = self._beats.register_script(_REQUEUE)
        self._stage = self._beats.register_script(_STAGE_FOR_REAPING)
        self._claim_write = self._sync.register_script(_CLAIM_WRITE)
        self.reachable = True  # Redis answered the last heartbeat (health reports NOT_SERVING while it does not)
        self._reachability = asyncio.Event()  # set (and replaced) whenever `reachable` changes
        self._reap_after = 0.0  # monotonic: no replica is declared lost before it had time to beat again
        self._held: collections.Counter[str] = collections.Counter()  # job id → claims held here
        self._last_share = 0.0
        self._orphan_suspects: set[str] = set()
        self._keep_alive_task: asyncio.Task[None] | None = None
        self._queued = asyncio.Event()  # set and replaced at every `queued` message
        self._queued_task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Check the connection (a clear error at startup beats one per request), then keep the heartbeat."""
        try:
            await self._redis.ping()
            await self._beat()
        except redis.RedisError as e:
            raise QueueUnavailable(f"cannot reach the queue's Redis at {without_password(self._url)}: {e}") from e
        self._keep_alive_task = asyncio.create_task(self._keep_alive(), name="sam2serve-redis-heartbeat")
        self._queued_task = asyncio.create_task(self._listen_queued(), name="sam2serve-redis-queued")
        log.info("job queue: Redis at %s, prefix %r, replica %s", without_password(self._url), self._prefix,
                 self.replica_id)

    async def close(self) -> None:
        """Stop; jobs still listed as running here go back to the front of the queue without counting as an
        attempt (else the others requeue them once this replica is found lost)."""
        self._closing = True
        await stop_tasks(self._keep_alive_task, self._queued_task)
        await self._events.close()
        with contextlib.suppress(redis.RedisError):
            await self._requeue_all(self._key("running", self.replica_id), self.replica_id, count_attempt=False)
            await self._beats.zrem(self._key("replicas"), self.replica_id)
        for client in (self._redis, self._beats):
            await client.aclose()
        self._sync.close()

    # -- callers -----------------------------------------------------------------------------------------------
    @_redis_errors_unavailable
    async def add(self, request: SegmentRequest) -> JobSnapshot:
        job_id, submitted_at, size = new_id(), time.time(), image_size(request)
        pushed = await self._add_script(
            keys=[self._key("pending"), self._key("job", ""), self._key("job", job_id), self._key("request", job_id),
                  self._key("queued")],
            args=[self._queue_size, job_id, self._queue_bytes, size, repr(submitted_at), jobcodec.encode(request),
                  UNFINISHED_TTL_S, int(request.image_kind == "url"), request.tenant])
        if pushed[0] < 0:
            raise queue_full(self._queue_size) if pushed[0] == -1 else queue_bytes_full(pushed[1], size,
                                                                                      self._queue_bytes)
        length = pushed[1]
        return JobSnapshot(job_id, JobState.IN_QUEUE, length - 1, 0.0, (), None, submitted_at, None, None, 1,
                           request.tenant)

    @_redis_errors_unavailable
    async def snapshot(self, job_id: str) -> JobSnapshot:
        async with self._redis.pipeline(transaction=True) as pipe:  # one consistent view
            pipe.hgetall(self._key("job", job_id))
            pipe.lrange(self._key("logs", job_id), 0, -1)
            pipe.lpos(self._key("pending"), job_id)
            fields, logs, position = await pipe.execute()
        return _snapshot(job_id, _text(fields), logs, position)

    async def changes(self, job_id: str) -> AsyncGenerator[JobSnapshot, None]:
        """Wakes on the job's channel (and, while it waits, on queue moves) through this replica's one
        pub/sub connection; re-reads at least every watch_poll_s in case Redis dropped a message."""
        try:
            async with self._events.watch(self._key("events", job_id), self._watch_poll_s) as inbox:
                # Subscribed: no change made after this point can be missed.
                seen: tuple[int, int] | None = None
                while True:
                    snapshot = await self.snapshot(job_id)
                    if (snapshot.version, snapshot.queue_position) != seen:
                        seen = (snapshot.version, snapshot.queue_position)
                        yield snapshot
                    if snapshot.state.terminal:
                        return
                    inbox.wants_moves = snapshot.state is JobState.IN_QUEUE
                    await inbox.wait(self._watch_poll_s)
        except redis.RedisError as e:
            log.warning("job queue: Redis error while watching %s: %s", job_id, e)
            raise _unavailable() from None

    @_redis_errors_unavailable
    async def result(self, job_id: str) -> JobResult:
        async with self._redis.pipeline(transaction=True) as pipe:  # one round trip
            pipe.hgetall(self._key("job", job_id))
            pipe.get(self._key("request", job_id))
            pipe.get(self._key("result", job_id))
            raw, request, outcome = await pipe.execute()
        snapshot = _snapshot(job_id, _text(raw), [], None)
        raise_unless_completed(job_id, snapshot.state, snapshot.error)
        if request is None or outcome is None:
            raise result_expired(job_id)
        return JobResult(job_id, jobcodec.decode(outcome), jobcodec.decode(request), snapshot.queue_seconds)

    @_redis_errors_unavailable
    async def cancel(self, job_id: str) -> tuple[CancelOutcome, JobSnapshot]:
        snapshot = await self.snapshot(job_id)
        if not snapshot.state.terminal:
            await self._redis.hset(self._key("job", job_id), "cancel", 1)  # checked at every decoder batch
            if await self._end(job_id, JobState.CANCELLED, taken_from=self._key("pending")):
                await self._redis.publish(self._key("moved"), job_id)
                return CancelOutcome.CANCELLED_IN_QUEUE, await self.snapshot(job_id)
            snapshot = await self.snapshot(job_id)
            if snapshot.state is JobState.IN_PROGRESS:
                await self._log(job_id, CANCELLING_MESSAGE)
                return CancelOutcome.CANCELLING_IN_PROGRESS, await self.snapshot(job_id)
            if snapshot.state in (JobState.IN_QUEUE, JobState.CANCELLED):  # taken by a worker that is about to
                return CancelOutcome.CANCELLING_IN_PROGRESS, snapshot  # see the flag, or that saw it already
        if snapshot.state is JobState.CANCELLED:
            return CancelOutcome.ALREADY_CANCELLED, snapshot
        return CancelOutcome.ALREADY_FINISHED, snapshot

    def waiting(self) -> float:
        """This replica's share of the shared queue: waiting jobs over live replicas, so that an autoscaler
        averaging the per-pod values sees the total over the pod count, as with per-pod queues. Called from
        metrics scrapes, off the event loop; while Redis is unreachable it repeats the last value (a negative
        or missing one would make an autoscaler act on nothing)."""
        try:
            seconds, micros = self._sync.time()
            with self._sync.pipeline(transaction=False) as pipe:
                pipe.llen(self._key("pending"))
                pipe.zcount(self._key("replicas"), seconds + micros / 1e6 - self._lost_after_s, "+inf")
                waiting, live = pipe.execute()
            self._last_share = int(waiting) / max(int(live), 1)
        except redis.RedisError:
            log.warning("job queue: Redis unreachable for a metrics scrape; repeating the last queue depth")
        return self._last_share

    def unfinished_here(self) -> list[str]:
        return []  # every replica answers for every job

    def finished_here_since(self, since: float) -> list[str]:
        return []  # every replica answers for every job

    # -- workers -----------------------------------------------------------------------------------------------
    @_redis_errors_unavailable
    async def claim(self, timeout_s: float, url: bool | None = None) -> Claim | None:
        pending, mine = self._key("pending"), self._key("running", self.replica_id)
        if url is not None:
            raw = await self._take_of_kind(url, timeout_s)
        elif timeout_s > 0:
            raw = await self._redis.blmove(pending, mine, math.ceil(timeout_s), "LEFT", "RIGHT")
        else:
            raw = await self._redis.lmove(pending, mine, "LEFT", "RIGHT")
        if raw is None:
            return None
        job_id = _bytes(raw).decode()
        self._held[job_id] += 1
        claim: Claim | None = None
        try:
            await self._redis.publish(self._key("moved"), job_id)
            claim = await self._claim_listed(job_id, mine)
            return claim
        finally:
            if claim is None:
                self._let_go(job_id)

    async def _take_of_kind(self, url: bool, timeout_s: float) -> Any:
        """The id `_TAKE_KIND` moved to this replica's running list, polled for up to `timeout_s`."""
        keys = [self._key("pending"), self._key("running", self.replica_id), self._key("job", "")]
        deadline = time.monotonic() + timeout_s
        while True:
            queued = self._queued  # taken before looking: a job queued meanwhile sets it
            if (raw := await self._take_kind(keys=keys, args=["1" if url else "0"])) is not None:
                return raw
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(queued.wait(), min(KIND_POLL_S, left))

    async def _listen_queued(self) -> None:
        """Wake the claims of one kind whenever a job enters `pending` (any replica's `queued` message)."""
        while not self._closing:
            try:
                pubsub = self._redis.pubsub()
                try:
                    await pubsub.subscribe(self._key("queued"))
                    while not self._closing:
                        message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=KIND_POLL_S)
                        if message is not None:
                            self._queued.set()
                            self._queued = asyncio.Event()
                finally:
                    await pubsub.aclose()
            except redis.RedisError as e:
                log.warning("job queue: lost the `queued` channel (%s); resubscribing", e)
                await asyncio.sleep(RECONNECT_S)  # a timer before reconnecting; claims poll meanwhile

    async def _claim_listed(self, job_id: str, mine: str) -> Claim | None:
        """Claim a job whose id was just moved to this replica's running list."""
        token = f"{self.replica_id}:{uuid.uuid4().hex[:12]}"  # this claim, not just this replica
        claimed = await self._claim_script(keys=[self._key("job", job_id), self._key("events", job_id)],
                                           args=[token, repr(time.time())])
        if claimed == 0:
            await self._end(job_id, JobState.CANCELLED, taken_from=mine)
            return None
        if claimed < 0:  # expired, or already handled (e.g. a retried submit pushed it twice)
            await self._redis.lrem(mine, 1, job_id)
            return None
        try:
            data = await self._redis.get(self._key("request", job_id))
            if data is None:
                raise not_found(job_id)
            return Claim(job_id, token, jobcodec.decode(_bytes(data)))
        except (JobNotFound, jobcodec.CodecError) as e:  # expired, or a request this version cannot read
            if not isinstance(e, JobNotFound):
                log.exception("request %s cannot be read", job_id)
            await self._end(job_id, JobState.FAILED, taken_from=mine, token=token, error=e)
            return None

    async def finish(self, claim: Claim, state: JobState, outcome: SegmentOutcome | None = None,
                     error: BaseException | None = None) -> bool:
        return await self._end(claim.job_id, state, taken_from=self._key("running", self.replica_id),
                               token=claim.token, outcome=outcome, error=error, request=claim.request)

    @_redis_errors_unavailable
    async def hand_back(self, claim: Claim) -> None:
        await self._hand_back(self._key("running", self.replica_id), claim.job_id)

    def release(self, claim: Claim) -> None:
        self._let_go(claim.job_id)

    def stop_requested(self, claim: Claim) -> bool:
        try:
            cancel, owner = self._sync.hmget(self._key("job", claim.job_id), ["cancel", "owner"])
        except redis.RedisError:
            raise _unavailable() from None
        return cancel == b"1" or owner != claim.token.encode()

    def report_progress(self, claim: Claim, fraction: float) -> None:
        self._write_for(claim, "", repr(fraction))

    def add_log(self, claim: Claim, message: str) -> None:
        self._write_for(claim, self._key("logs", claim.job_id), json.dumps([time.time(), message]))

    # -- internals ---------------------------------------------------------------------------------------------
    def _write_for(self, claim: Claim, logs: str, value: str) -> None:
        """A progress value (`logs` '') or a log entry, written only while `claim` holds its job."""
        try:
            self._claim_write(keys=[self._key("job", claim.job_id), self._key("events", claim.job_id), logs],
                              args=[claim.token, value, UNFINISHED_TTL_S])
        except redis.RedisError:
            raise _unavailable() from None

    def _let_go(self, job_id: str) -> None:
        self._held[job_id] -= 1
        if self._held[job_id] <= 0:
            del self._held[job_id]

    @_redis_errors_unavailable
    async def _end(self, job_id: str, state: JobState, taken_from: str = "", token: str = "",
                   error: BaseException | None = None, outcome: SegmentOutcome | None = None,
                   request: SegmentRequest | None = None) -> bool:
        """End the job, if `job_id` can still be taken from the list `taken_from` ('' for none) and (with a
        `token`) the job is still that claim's. False when another claim owns it, or it had already ended."""
        if request is None:
            request = await self._stored_request(job_id)
        kind, message = stored_error(error) if error is not None else ("", "")
        done = await self._finish_script(
            keys=[self._key("job", job_id), taken_from, self._key("result", job_id), self._key("request", job_id),
                  self._key("logs", job_id), self._key("events", job_id)],
            args=[job_id, state.name, repr(time.time()), kind, message, self._ttl,
                  jobcodec.encode(outcome) if outcome is not None else b"",
                  jobcodec.encode(request.without_image()) if request is not None else b"", token,
                  uuid.uuid4().hex])
        if done != 1:
            return False
        await self._emit_finished(job_id, state, request.without_image() if request is not None else None,
                                  error_from(kind, message) if error is not None else None, outcome)
        return True

    async def _stored_request(self, job_id: str) -> SegmentRequest | None:
        data = await self._redis.get(self._key("request", job_id))
        try:
            return jobcodec.decode(_bytes(data)) if data is not None else None
        except jobcodec.CodecError:
            return None

    async def _emit_finished(self, job_id: str, state: JobState, request: SegmentRequest | None,
                             error: BaseException | None, outcome: SegmentOutcome | None) -> None:
        """`JobFinished` for a job this replica ended."""
        if self._on_finished is None or request is None:
            return
        try:
            times = await self._redis.hmget(self._key("job", job_id), ["submitted_at", "started_at", "finished_at"])
            submitted, started, finished = (float(t) if t else None for t in times)
            now = time.time()
            self._on_finished(JobFinished(job_id, state, request, submitted or now, started, finished or now, error,
                                          outcome))
        except Exception:
            log.exception("job queue: a JobFinished listener failed for %s", job_id)

    async def _log(self, job_id: str, message: str) -> None:
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.rpush(self._key("logs", job_id), json.dumps([time.time(), message]))
            pipe.expire(self._key("logs", job_id), UNFINISHED_TTL_S)
            pipe.hincrby(self._key("job", job_id), "version", 1)
            pipe.publish(self._key("events", job_id), "log")
            await pipe.execute()

    # -- liveness ----------------------------------------------------------------------------------------------
    async def _keep_alive(self) -> None:
        while not self._closing:
            # A timer, not a wait for another task; while Redis is unreachable it looks every second, so that
            # health is SERVING again soon after Redis is back.
            await asyncio.sleep(self._heartbeat_s if self.reachable else min(self._heartbeat_s, 1.0))
            try:
                await self._beat()
                self._set_reachable(True)
                await self.requeue_lost_jobs()
                await self.hand_back_orphans()
            except asyncio.CancelledError:
                raise
            except redis.RedisError as e:
                log.warning("job queue: heartbeat failed (%s)", e)
                self._set_reachable(False)
            except Exception as e:  # the heartbeat must outlive any one failure
                log.warning("job queue: heartbeat round failed (%s)", e)

    def _set_reachable(self, reachable: bool) -> None:
        if reachable == self.reachable:
            return
        self.reachable = reachable
        if reachable:  # the others could not beat either: give them a full period before reaping them
            self._reap_after = time.monotonic() + self._lost_after_s
            log.warning("job queue: Redis is reachable again")
        else:
            log.warning("job queue: Redis is unreachable; health reports NOT_SERVING until it is back")
        changed, self._reachability = self._reachability, asyncio.Event()
        changed.set()

    async def reachability_changed(self) -> bool:
        """Wait until `reachable` changes; its new value."""
        await self._reachability.wait()
        return self.reachable

    async def _beat(self) -> None:
        seconds, micros = await self._beats.time()
        await self._beats.zadd(self._key("replicas"), {self.replica_id: seconds + micros / 1e6})

    async def requeue_lost_jobs(self) -> int:
        """Jobs taken by replicas whose heartbeat stopped: back to the front of the queue, or failed after
        MAX_ATTEMPTS runs. Returns how many were found. Any replica may do this; each job moves once. Not
        within a heartbeat period after Redis came back: every replica's heartbeat is old then."""
        if time.monotonic() < self._reap_after:
            return 0
        seconds, micros = await self._beats.time()
        cutoff = seconds + micros / 1e6 - self._lost_after_s
        found = 0
        lost = await self._beats.zrangebyscore(self._key("replicas"), "-inf", cutoff, withscores=True)
        for raw, score in cast("list[tuple[bytes, float]]", lost):
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

    async def hand_back_orphans(self) -> None:
        """Ids in this replica's running list that it holds no claim on (a BLMOVE reply lost to a network
        error, or a Redis error before the job ended) go back to the queue. Only ids found so in two rounds in
        a row: one in the list but not yet claimed may just be a BLMOVE whose reply is on its way."""
        mine = self._key("running", self.replica_id)
        listed = {_bytes(raw).decode() for raw in await self._beats.lrange(mine, 0, -1)} - set(self._held)
        suspects, self._orphan_suspects = self._orphan_suspects, listed
        for job_id in listed & suspects:
            if job_id not in self._held:
                await self._hand_back(mine, job_id)
                log.warning("job queue: handed back %s, which this replica had listed but was not running", job_id)

    async def _requeue_all(self, source: str, replica: str, count_attempt: bool) -> int:
        moved = 0
        while (result := await self._requeue(keys=self._requeue_keys(source),
                                             args=["", "1" if count_attempt else "0", MAX_ATTEMPTS,
                                                   repr(time.time())])) is not None:
            moved += 1
            job_id, outcome = result[0].decode(), int(result[2])
            if outcome == 1:
                await self._log(job_id, f"the replica running this request ({replica}) stopped; queued again")
                await self._beats.publish(self._key("moved"), job_id)
                await self._beats.publish(self._key("queued"), job_id)
                log.warning("job queue: requeued %s from replica %s", job_id, replica)
            elif outcome == 0:
                await self._after_failing_lost(job_id)
                log.warning("job queue: failed %s from replica %s", job_id, replica)
        return moved

    async def _after_failing_lost(self, job_id: str) -> None:
        """A job the requeue script failed: keep it only as long as finished jobs, without its image."""
        request = await self._stored_request(job_id)
        async with self._redis.pipeline(transaction=True) as pipe:
            if request is not None:
                pipe.set(self._key("request", job_id), jobcodec.encode(request.without_image()), ex=self._ttl)
            for kind in ("job", "logs"):
                pipe.expire(self._key(kind, job_id), self._ttl)
            await pipe.execute()
        snapshot = await self.snapshot(job_id)
        await self._emit_finished(job_id, JobState.FAILED, request, snapshot.error, None)

    async def _hand_back(self, running: str, job_id: str) -> None:
        """`job_id` from `running` to the front of the queue, not counted as an attempt."""
        await self._requeue(keys=self._requeue_keys(running), args=[job_id, "0", MAX_ATTEMPTS, repr(time.time())])
        await self._beats.publish(self._key("queued"), job_id)

    def _requeue_keys(self, running: str) -> list[str]:
        return [running, self._key("pending"), self._key("job", ""), self._key("events", "")]

    def _key(self, *parts: str) -> str:
        return self._prefix + ":".join(parts)


def _bytes(value: bytes | str) -> bytes:
    """Replies are bytes (the clients do not decode them), though the clients' types allow str too."""
    return value if isinstance(value, bytes) else value.encode()


def _text(fields: dict[bytes, bytes]) -> dict[str, str]:
    return {k.decode(): v.decode() for k, v in fields.items()}


def _snapshot(job_id: str, fields: dict[str, str], logs: list[bytes], position: int | None) -> JobSnapshot:
    if "state" not in fields or "submitted_at" not in fields:
        raise not_found(job_id)

    def time_or_none(name: str) -> float | None:
        return float(fields[name]) if fields.get(name) else None

    error: BaseException | None = None
    if fields.get("state") == JobState.FAILED.name:
        error = error_from(fields.get("error_kind", ""), fields.get("error_message") or "")
    entries = tuple((float(t), str(m)) for t, m in (json.loads(e) for e in logs))
    return JobSnapshot(job_id, JobState[fields["state"]], position if position is not None else 0,
                       float(fields.get("progress", 0)), entries, error, float(fields["submitted_at"]),
                       time_or_none("started_at"), time_or_none("finished_at"), int(fields.get("version", 0)),
                       fields.get("tenant", ""))
