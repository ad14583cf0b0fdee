"""One pub/sub connection per replica for every status watcher: a dispatcher task reads the job channels
and wakes the watchers of each, so that 1 000 open `WatchStatus` streams hold one Redis connection, not
1 000 (a pool of 1 024 gave "Too many connections" at 1 100 watchers).

A watcher's inbox is an `asyncio.Event`: messages about a job only say "read it again", so wake-ups
coalesce. redis-py's PubSub re-subscribes every channel when it reconnects; each subscribe confirmation for
a channel already confirmed is such a reconnect, and wakes that channel's watchers to re-read what they may
have missed."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

import redis
import redis.asyncio as aioredis

log = logging.getLogger(__name__)

IDLE_READ_S = 5.0
RETRY_AFTER_S = 1.0  # the dispatcher's pause after its connection failed beyond redis-py's own retries
TASK_STOP_S = 5.0


async def stop_tasks(*tasks: asyncio.Task[None] | None) -> None:
    """Cancel background loops and wait for them, boundedly. On Python 3.11 a cancellation that meets a timeout
    expiring inside redis-py's reads can be lost; the loops also check a closing flag, so they end at their
    next turn either way, and a close never hangs on them."""
    running = {task for task in tasks if task is not None}
    for task in running:
        task.cancel()
    if not running:
        return
    done, late = await asyncio.wait(running, timeout=TASK_STOP_S)
    for task in done:
        if not task.cancelled():
            task.exception()  # retrieved: a loop that failed was already logged
    for task in late:
        log.warning("job queue: background task %s did not stop within %.0f s", task.get_name(), TASK_STOP_S)


class Inbox:
    """What a watcher waits on: set by every message of its job's channel (and of the `moved` channel while
    `wants_moves`, i.e. while its job waits in the queue)."""

    def __init__(self) -> None:
        self.event = asyncio.Event()
        self.wants_moves = True

    async def wait(self, timeout_s: float) -> None:
        """Until the next message, or `timeout_s` (a re-read in case a message was lost); then clear."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                await self.event.wait()
        self.event.clear()


class JobEvents:
    def __init__(self, client: aioredis.Redis, moved_channel: str) -> None:
        self._client, self._moved = client, moved_channel.encode()
        self._pubsub: aioredis.client.PubSub | None = None
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._watchers: dict[bytes, set[Inbox]] = {}
        self._confirmed: dict[bytes, asyncio.Event] = {}  # channel → set once Redis confirmed the subscription
        self._sending = asyncio.Lock()  # subscribe/unsubscribe reach Redis in the order they were decided
        self.connections = 0  # pub/sub connections taken (for tests: one per replica, whatever the watchers)

    @contextlib.asynccontextmanager
    async def watch(self, channel: str, confirm_timeout_s: float) -> AsyncIterator[Inbox]:
        """An inbox for `channel`, subscribed (confirmed by Redis, or after `confirm_timeout_s`) before it is
        yielded, so that a read made after this point misses no change."""
        key, inbox = channel.encode(), Inbox()
        watchers = self._watchers.setdefault(key, set())
        first = not watchers
        watchers.add(inbox)
        try:
            if first:
                self._confirmed[key] = asyncio.Event()
                await self._send("subscribe", key)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(confirm_timeout_s):
                    await self._confirmed[key].wait()
            yield inbox
        finally:
            watchers.discard(inbox)
            if not watchers:
                del self._watchers[key]
                self._confirmed.pop(key, None)
                with contextlib.suppress(redis.RedisError):
                    await self._send("unsubscribe", key)

    async def close(self) -> None:
        self._closing = True
        await stop_tasks(self._task)
        if self._pubsub is not None:
            await self._pubsub.aclose()

    async def _send(self, command: str, channel: bytes) -> None:
        async with self._sending:
            pubsub = self._started()
            if command == "subscribe":
                await pubsub.subscribe(channel)
            elif channel in pubsub.channels:
                await pubsub.unsubscribe(channel)

    def _started(self) -> aioredis.client.PubSub:
        if self._pubsub is None:
            self._pubsub = self._client.pubsub()
            self.connections += 1
            self._task = asyncio.create_task(self._dispatch(self._pubsub), name="sam2serve-redis-events")
        return self._pubsub

    async def _dispatch(self, pubsub: aioredis.client.PubSub) -> None:
        async with self._sending:
            await pubsub.subscribe(self._moved)
        while not self._closing:
            try:
                # A bounded wait, so that redis-py's health check (a PING every health_check_interval) runs
                # on an idle connection and a dead one is found.
                message = await pubsub.get_message(timeout=IDLE_READ_S)
                if message is not None:
                    self._deliver(message["type"], message["channel"])
            except asyncio.CancelledError:
                raise
            except (redis.RedisError, OSError) as e:  # beyond redis-py's retries: Redis is down; wake everyone
                log.warning("job queue: status events connection failed (%s); reconnecting", e)
                self._wake_all()
                await asyncio.sleep(RETRY_AFTER_S)  # a timer between reconnection attempts

    def _deliver(self, kind: str | bytes, channel: bytes) -> None:
        kind = kind.decode() if isinstance(kind, bytes) else kind
        if kind == "subscribe":
            confirmed = self._confirmed.get(channel)
            if confirmed is not None:
                resubscribed = confirmed.is_set()
                confirmed.set()
                if not resubscribed:
                    return
            elif channel != self._moved:
                return
            if channel == self._moved:  # re-subscribed after a reconnect: anything may have changed
                self._wake_all()
                return
        elif kind != "message":
            return
        if channel == self._moved:
            for inboxes in self._watchers.values():
                for inbox in inboxes:
                    if inbox.wants_moves:
                        inbox.event.set()
            return
        for inbox in self._watchers.get(channel, ()):
            inbox.event.set()

    def _wake_all(self) -> None:
        for inboxes in self._watchers.values():
            for inbox in inboxes:
                inbox.event.set()
