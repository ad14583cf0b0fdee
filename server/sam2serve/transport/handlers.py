"""Method handlers rebuilt around a servicer's: the same method with another behaviour, another deserializer
or another kind (gRPC's four kinds of handler each have their own constructor)."""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

Deserializer = Callable[[bytes], Any] | None


def rebuilt(handler: grpc.RpcMethodHandler[Any, Any], behaviour: Callable[..., Any], *,
            request_streaming: bool | None = None,
            deserializer: Deserializer = None) -> grpc.RpcMethodHandler[Any, Any]:
    """A handler of `handler`'s kind (or with `request_streaming` overridden) that runs `behaviour`."""
    streaming_in = handler.request_streaming if request_streaming is None else request_streaming
    make = {(False, False): grpc.unary_unary_rpc_method_handler,
            (False, True): grpc.unary_stream_rpc_method_handler,
            (True, False): grpc.stream_unary_rpc_method_handler,
            (True, True): grpc.stream_stream_rpc_method_handler}[(streaming_in, handler.response_streaming)]
    return make(behaviour, request_deserializer=deserializer or handler.request_deserializer,
                response_serializer=handler.response_serializer)


def behaviour_of(handler: grpc.RpcMethodHandler[Any, Any]) -> Callable[..., Any]:
    return (handler.unary_unary or handler.unary_stream or handler.stream_unary  # type: ignore[return-value]
            or handler.stream_stream)


def guarded(handler: grpc.RpcMethodHandler[Any, Any],
            check: Callable[[Any, grpc.aio.ServicerContext], Awaitable[None]]) -> Callable[..., Any]:
    """`handler`'s behaviour, after `await check(request, context)` (which may abort the call)."""
    inner = behaviour_of(handler)
    if inspect.isasyncgenfunction(inner):
        async def stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            await check(request, context)
            async for item in inner(request, context):
                yield item

        return stream

    async def call(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await check(request, context)
        return await inner(request, context)

    return call
