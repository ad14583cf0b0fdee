"""Optional API-key authentication: `authorization: Key <key>` (as fal) or `Bearer <key>`, for every protocol;
each key names its tenant (`sam2serve.tenants`)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import Any

import grpc

from ..tenants import DEFAULT_TENANT, ApiKeys
from .handlers import rebuilt

OPEN_SERVICES = ("/grpc.health.v1.Health/", "/grpc.reflection.")  # probes and discovery stay reachable
MISSING_KEY = "missing or invalid API key: send 'Authorization: Key <key>' (or 'Bearer <key>')"


def tenant_of(keys: ApiKeys, metadata: Iterable[tuple[str, str | bytes]] | None) -> str | None:
    """The caller's tenant from gRPC metadata (its `authorization` entry); None when it carries no key of `keys`
    (without keys, everyone is the default tenant)."""
    if not keys.required:
        return DEFAULT_TENANT
    for name, value in metadata or ():
        if name == "authorization" and (tenant := keys.tenant_of(value)) is not None:
            return tenant
    return None


class ApiKeyInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, keys: ApiKeys, on_reject: Callable[[], None] = lambda: None) -> None:
        self._keys = keys
        self._on_reject = on_reject

    def _authorised(self, metadata: tuple[tuple[str, str | bytes], ...]) -> bool:
        return tenant_of(self._keys, metadata) is not None

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
