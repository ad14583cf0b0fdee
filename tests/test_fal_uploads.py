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
