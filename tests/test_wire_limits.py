"""What reaches the process from the wire before a request is admitted: callers without an API key get
UNAUTHENTICATED without their message being read or parsed, and no request larger than the image cap allows
is received at all."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from sam2serve.transport.auth import ApiKeyInterceptor
from sam2serve.transport.server import receive_limit
from sam2serve.transport.wire import UndecodableRequests

METHOD = "/test.Echo/Size"


def test_a_caller_without_the_key_is_refused_without_its_message_being_parsed():
    """Before, the refusal was a unary handler: gRPC received and parsed up to max_message_bytes (64 MiB) of
    every unauthenticated call before the interceptor's handler said UNAUTHENTICATED."""
    parsed: list[int] = []

    def parse(data: bytes) -> int:
        parsed.append(len(data))
        return len(data)

    async def size(request: int, context: grpc.aio.ServicerContext) -> bytes:
        return str(request).encode()

    async def main() -> None:
        server = grpc.aio.server(interceptors=[ApiKeyInterceptor("k3y"), UndecodableRequests()],
                                 options=[("grpc.max_receive_message_length", 32 << 20)])
        server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("test.Echo", {
            "Size": grpc.unary_unary_rpc_method_handler(size, request_deserializer=parse)})])
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=[
                    ("grpc.max_send_message_length", 32 << 20)]) as channel:
                call = channel.unary_unary(METHOD)
                big = b"\x0a" * (16 << 20)
                for metadata in ((), (("authorization", "Key wrong"),)):
                    with pytest.raises(grpc.aio.AioRpcError) as refused:
                        await call(big, metadata=metadata, timeout=30)
                    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
                    assert "API key" in (refused.value.details() or "")
                assert parsed == []
                assert await call(b"\x0a" * 1000, metadata=(("authorization", "Key k3y"),), timeout=30) == b"1000"
                assert parsed == [1000]
        finally:
            await server.stop(None)

    asyncio.run(main())


def test_the_receive_limit_follows_the_image_cap():
    """Before, every request up to max_message_bytes (64 MiB) was received and parsed, whatever the image cap
    (20 MiB); now the limit is the cap as a data URI (4/3 of it) plus the other fields."""
    assert receive_limit(64 << 20, 20 << 20) == 27962028 + 64 * 1024  # ceil(20 MiB / 3) * 4
    assert receive_limit(64 << 20, 3000) == 4000 + 64 * 1024
    assert receive_limit(64 * 1024, 20 << 20) == 64 * 1024  # never above the message limit
