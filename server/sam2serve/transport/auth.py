"""Optional API-key authentication: `authorization: Key <key>` (as fal) or `Bearer <key>`, for every protocol."""

from __future__ import annotations

import hmac
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from .handlers import rebuilt

OPEN_SERVICES = ("/grpc.health.v1.Health/", "/grpc.reflection.")  # probes and discovery stay reachable
MISSING_KEY = "missing or invalid API key: send 'Authorization: Key <key>' (or 'Bearer <key>')"


def key_matches(authorization: str | bytes, key: bytes) -> bool:
    """Whether an authorization header/metadata value carries `key` (compared in constant time)."""
    text = authorization.decode(errors="replace") if isinstance(authorization, bytes) else authorization
    scheme, _, token = text.partition(" ")
    return scheme.lower() in ("key", "bearer") and hmac.compare_digest(token.strip().encode(), key)


class ApiKeyInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, api_key: str, on_reject: Callable[[], None] = lambda: None) -> None:
        self._key = api_key.encode()
        self._on_reject = on_reject

    def _authorised(self, metadata: tuple[tuple[str, str | bytes], ...]) -> bool:
        return any(name == "authorization" and key_matches(value, self._key) for name, value in metadata)

    async def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = await continuation(details)
        if details.method.startswith(OPEN_SERVICES) or handler is None:
            return handler
        if self._authorised(tuple(details.invocation_metadata or ())):
            return handler
        self._on_reject()
        return _deny(handler)


def _deny(handler: grpc.RpcMethodHandler[Any, Any]) -> grpc.RpcMethodHandler[Any, Any]:
    """UNAUTHENTICATED without reading the request: the handler is a request-streaming one that never asks
    for a message, so a caller without a key cannot make the server receive (beyond HTTP/2's flow-control
    window) or parse a message of up to max_message_bytes."""
    message = MISSING_KEY

    async def unary(requests: object, context: grpc.aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    async def stream(requests: object, context: grpc.aio.ServicerContext) -> AsyncIterator[None]:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
        yield  # pragma: no cover

    return rebuilt(handler, stream if handler.response_streaming else unary, request_streaming=True)
