"""The upload store of fal's HTTP API (in this process, and in Redis): a token is issued, takes one PUT, and
`expects` says so cheaply, before an unauthenticated PUT's body is read."""

from __future__ import annotations

import asyncio

import pytest

from conftest import needs_redis
from sam2serve.transport.fal.uploads import MemoryUploads, RedisUploads, Uploads


@pytest.mark.parametrize("kind", ["memory", pytest.param("redis", marks=needs_redis)])
def test_only_an_issued_empty_token_is_expected(kind: str, request: pytest.FixtureRequest):
    redis_url = request.getfixturevalue("redis_url") if kind == "redis" else ""

    async def scenario() -> None:
        uploads: Uploads = (RedisUploads(redis_url, "test-uploads:", ttl_s=60) if redis_url
                            else MemoryUploads(ttl_s=60, max_bytes=1 << 20))
        try:
            token = await uploads.issue()
            assert await uploads.expects(token)
            assert not await uploads.expects("x" * 32)  # never issued
            assert await uploads.put(token, b"png")
            assert not await uploads.expects(token)  # filled: a second PUT is refused before its body is read
            assert await uploads.get(token) == b"png"
        finally:
            await uploads.close()

    asyncio.run(scenario())


@needs_redis
def test_the_redis_upload_store_refuses_what_passes_its_byte_budget(redis_url: str):
    """Before, the Redis store had no byte budget: uploads filled Redis until the TTL ran out."""
    from sam2serve.errors import Overloaded

    async def scenario() -> None:
        uploads = RedisUploads(redis_url, "budget-uploads:", ttl_s=60, max_bytes=10)
        other = RedisUploads(redis_url, "budget-uploads:", ttl_s=60, max_bytes=10)  # another replica
        try:
            assert await uploads.put(await uploads.issue(), b"123456")
            refused = await other.issue()
            with pytest.raises(Overloaded, match="holds 6 bytes; 6 bytes more would pass its budget of 10 bytes"):
                await other.put(refused, b"abcdef")
            assert await other.expects(refused)  # still empty: a smaller upload may take it
            assert await other.put(refused, b"abcd")
        finally:
            await uploads.close()
            await other.close()

    asyncio.run(scenario())
