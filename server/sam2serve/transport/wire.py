"""Requests whose bytes are not the method's protobuf message: INVALID_ARGUMENT naming the message type, not
gRPC's default UNKNOWN naming a Python exception class."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from .handlers import guarded, rebuilt


class _Undecodable:
    """What the deserializer hands the behaviour instead of a message it could not parse."""


UNDECODABLE = _Undecodable()


class UndecodableRequests(grpc.aio.ServerInterceptor):
    def __init__(self, on_reject: Callable[[], None] = lambda: None) -> None:
        self._on_reject = on_reject

    async def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = await continuation(details)
        if handler is None or handler.request_streaming or handler.request_deserializer is None:
            return handler  # streamed requests (reflection) are left to gRPC
        parse = handler.request_deserializer
        message_type = _message_type(details.method)

        def deserialize(data: bytes) -> Any:
            try:
                return parse(data)
            except DecodeError:
                return UNDECODABLE

        async def refuse_undecodable(request: Any, context: grpc.aio.ServicerContext) -> None:
            if request is UNDECODABLE:
                self._on_reject()
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                    f"the request is not a valid {message_type} message (protobuf wire format)")

        return rebuilt(handler, guarded(handler, refuse_undecodable), deserializer=deserialize)


def _message_type(method: str) -> str:
    """The request message's name for `method` ('/sam2serve.v1.AutoSegmentService/Submit'), from the protos."""
    from google.protobuf import descriptor_pool

    service, _, name = method.strip("/").rpartition("/")
    try:
        return str(descriptor_pool.Default().FindServiceByName(service).FindMethodByName(name).input_type.full_name)
    except KeyError:
        return f"{method} request"
