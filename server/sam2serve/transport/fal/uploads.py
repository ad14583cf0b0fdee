"""Files the JavaScript client uploads before a request (a Blob or File in the input becomes a URL).

@fal-ai/client asks `rest.fal.ai/storage/upload/initiate` for an upload URL, PUTs the bytes there (with no
Authorization header) and sends the file URL it was given in place of the Blob. Here both URLs are
`<base>/fal/uploads/<token>`: the token is issued to an authenticated caller, accepts one PUT, and a request
whose image_url names it reads the bytes from this store instead of fetching a URL. Kept in Redis when the
queue is (any replica may take the PUT or the request), else in this process; either way for the result TTL.
fal-ai/sam2/image's output pictures (without sync_mode) are kept in the same store, under the same rules.
"""

from __future__ import annotations

import contextlib
import re
import secrets
import time
from collections.abc import AsyncIterator
from typing import Protocol
from urllib.parse import urlsplit

from ...errors import Overloaded, QueueUnavailable
from ...limits import describe_bytes

UPLOAD_PATH = "/fal/uploads/"
# an upload, or an output picture of fal-ai/sam2/image kept here (its file name after the token)
_TOKEN = re.compile(r"^/fal/uploads/([A-Za-z0-9_-]{22,64})(?:/[A-Za-z0-9_.-]+)?$")


class Uploads(Protocol):
    async def issue(self) -> str: ...
    async def expects(self, token: str) -> bool:
        """Whether `token` was issued and is still empty: a cheap check before a PUT's body is read."""
        ...
    async def put(self, token: str, data: bytes) -> bool:
        """Store the bytes of an issued token not yet filled; False otherwise."""
        ...
    async def get(self, token: str) -> bytes | None: ...
    async def close(self) -> None: ...


async def keep(uploads: Uploads, data: bytes) -> str:
    """Store `data` under a new token (as an issued upload filled at once); the token."""
    token = await uploads.issue()
    if not await uploads.put(token, data):
        raise RuntimeError("a token issued a moment ago took no data")
    return token


def token_of(url: str) -> str | None:
    """The token of an upload URL of this server (any host: the token itself is the capability)."""
    try:
        match = _TOKEN.match(urlsplit(url).path)
    except ValueError:
        return None
    return match.group(1) if match else None


class MemoryUploads:
    def __init__(self, ttl_s: float, max_bytes: int) -> None:
        self._ttl, self._max_bytes = ttl_s, max_bytes
        self._files: dict[str, tuple[float, bytes | None]] = {}

    async def issue(self) -> str:
        self._expire()
        token = secrets.token_urlsafe(24)
        self._files[token] = (time.monotonic() + self._ttl, None)
        return token

    async def expects(self, token: str) -> bool:
        self._expire()
        entry = self._files.get(token)
        return entry is not None and entry[1] is None

    async def put(self, token: str, data: bytes) -> bool:
        self._expire()
        entry = self._files.get(token)
        if entry is None or entry[1] is not None:
            return False
        self._files[token] = (entry[0], data)
        return True

    async def get(self, token: str) -> bytes | None:
        self._expire()
        entry = self._files.get(token)
        return entry[1] if entry else None

    async def close(self) -> None:
        self._files.clear()

    def _expire(self) -> None:
        now, stored = time.monotonic(), 0
        for token, (expires, data) in sorted(self._files.items(), key=lambda item: -item[1][0]):
            stored += len(data or b"")
            if expires < now or stored > self._max_bytes:  # expired, or beyond the store's byte budget (oldest go)
                del self._files[token]


class RedisUploads:
    """Uploads shared by every replica, within `max_bytes` for all of them together (0: no budget): a PUT
    beyond it is refused (`Overloaded`, with the budget) until older uploads expire."""

    def __init__(self, url: str, prefix: str, ttl_s: float, max_bytes: int = 0) -> None:
        import redis.asyncio as aioredis

        self._redis = aioredis.Redis.from_url(url)
        self._prefix, self._ttl, self._max_bytes = prefix + "upload:", max(1, int(ttl_s)), max_bytes
        # the filled uploads' expiry times and sizes, and their total, so the budget needs no scan of the keys
        self._books = [prefix + "uploads-expiry", prefix + "uploads-size", prefix + "uploads-bytes"]

    async def issue(self) -> str:
        token = secrets.token_urlsafe(24)
        async with _unavailable_on_redis_errors():
            await self._redis.set(self._prefix + token, b"", ex=self._ttl)
        return token

    async def expects(self, token: str) -> bool:
        async with _unavailable_on_redis_errors():
            return bool(await self._redis.eval(_IS_EMPTY, 1, self._prefix + token))

    async def put(self, token: str, data: bytes) -> bool:
        # One PUT per token: only an issued, still empty key is filled (the script makes check and set atomic).
        async with _unavailable_on_redis_errors():
            filled, held = await self._redis.eval(_FILL_IF_EMPTY, 4, self._prefix + token, *self._books, token, data,
                                                  self._ttl, self._max_bytes)
        if filled < 0:
            raise Overloaded(f"the upload store holds {describe_bytes(int(held))}; {describe_bytes(len(data))} more "
                             f"would pass its budget of {describe_bytes(self._max_bytes)} (all replicas together); "
                             "retry when older uploads have expired")
        return bool(filled)

    async def get(self, token: str) -> bytes | None:
        async with _unavailable_on_redis_errors():
            data = await self._redis.get(self._prefix + token)
        return data.encode() if isinstance(data, str) else data or None  # bytes: no decode_responses here

    async def close(self) -> None:
        await self._redis.aclose()


@contextlib.asynccontextmanager
async def _unavailable_on_redis_errors() -> AsyncIterator[None]:
    import redis

    try:
        yield
    except redis.RedisError as e:
        raise QueueUnavailable(f"the upload store is unreachable; retry later ({type(e).__name__})") from None


_IS_EMPTY = """
return redis.call('EXISTS', KEYS[1]) == 1 and redis.call('STRLEN', KEYS[1]) == 0
"""
# KEYS: the token's key, expiries (zset token → expiry), sizes (hash token → bytes), total bytes held.
# ARGV: token, data, ttl s, budget (0: none). {1, held} filled; {0, held} not an issued empty token;
# {-1, held} over the budget. Expired uploads leave the books first.
_FILL_IF_EMPTY = """
local now = tonumber(redis.call('TIME')[1])
for _, old in ipairs(redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now)) do
  redis.call('DECRBY', KEYS[4], tonumber(redis.call('HGET', KEYS[3], old) or '0'))
  redis.call('HDEL', KEYS[3], old)
  redis.call('ZREM', KEYS[2], old)
end
local held = tonumber(redis.call('GET', KEYS[4]) or '0')
if redis.call('STRLEN', KEYS[1]) ~= 0 or redis.call('EXISTS', KEYS[1]) == 0 then return {0, held} end
local budget, size = tonumber(ARGV[4]), string.len(ARGV[2])
if budget > 0 and held + size > budget then return {-1, held} end
redis.call('SET', KEYS[1], ARGV[2], 'EX', ARGV[3])
redis.call('ZADD', KEYS[2], now + tonumber(ARGV[3]), ARGV[1])
redis.call('HSET', KEYS[3], ARGV[1], size)
redis.call('INCRBY', KEYS[4], size)
return {1, held + size}
"""
