"""The AutoSegmentService servicer: protobuf in, data-plane calls, protobuf out. Errors are mapped to a gRPC
status in one place, the `observed` wrapper every RPC goes through."""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from typing import Any, Protocol

import grpc

from ..domain import SegmentRequest
from ..error_table import error_code
from ..errors import ResultTooLarge, Unauthenticated
from ..jobs import CancelOutcome, JobResult, JobService
from ..metrics import Metrics
from ..request_fields import RequestLimits
from ..tenants import ApiKeys
from ..v1 import sam2serve_pb2 as pb
from ..v1 import sam2serve_pb2_grpc as pb_grpc
from .auth import MISSING_KEY, tenant_of
from .convert import to_response, to_segment_request, to_status

log = logging.getLogger(__name__)

_CANCEL = {CancelOutcome.CANCELLED_IN_QUEUE: pb.CancelResponse.CANCELLED_IN_QUEUE,
           CancelOutcome.CANCELLING_IN_PROGRESS: pb.CancelResponse.CANCELLING_IN_PROGRESS,
           CancelOutcome.ALREADY_CANCELLED: pb.CancelResponse.ALREADY_CANCELLED,
           CancelOutcome.ALREADY_FINISHED: pb.CancelResponse.ALREADY_FINISHED}
PROTOCOL = "grpc"  # the protocol label of this adapter's metrics


class Observable(Protocol):
    """A servicer `observed` can wrap the methods of (AutoSegmentServicer, PromptSegmentServicer)."""

    metrics: Metrics


def observed(rpc: Callable[..., Any]) -> Callable[..., Any]:
    """Every RPC: an error becomes its status (`error_table`; INTERNAL, logged, for a bug), and
    the call is counted by method and final status code and timed (sam2serve_requests_total, ...)."""
    name = rpc.__name__

    async def fail(self: Observable, context: grpc.aio.ServicerContext, exc: Exception) -> None:
        code, message = error_code(exc)
        if code.rejected:
            self.metrics.rejected.labels(code.rejected, PROTOCOL).inc()
        if code.grpc is grpc.StatusCode.INTERNAL:
            log.error("internal error in %s", type(exc).__name__, exc_info=exc)
        await context.abort(code.grpc, message)

    def record(self: Observable, start: float, context: grpc.aio.ServicerContext,
               exc: BaseException | None) -> None:
        if exc is None:
            code = "OK"
        elif isinstance(exc, asyncio.CancelledError):
            code = "CANCELLED"
        else:
            got = context.code()
            code = got.name if isinstance(got, grpc.StatusCode) else "UNKNOWN"
        self.metrics.requests.labels(name, code, PROTOCOL).inc()
        self.metrics.request_seconds.labels(name, PROTOCOL).observe(time.perf_counter() - start)

    if inspect.isasyncgenfunction(rpc):
        @functools.wraps(rpc)
        async def streaming(self: Observable, request: Any, context: grpc.aio.ServicerContext) -> Any:
            start, error = time.perf_counter(), None
            try:
                try:
                    async for item in rpc(self, request, context):
                        yield item
                except Exception as e:
                    await fail(self, context, e)
            except BaseException as e:
                error = e
                raise
            finally:
                record(self, start, context, error)

        return streaming

    @functools.wraps(rpc)
    async def unary(self: Observable, request: Any, context: grpc.aio.ServicerContext) -> Any:
        start, error = time.perf_counter(), None
        try:
            try:
                return await rpc(self, request, context)
            except Exception as e:
                await fail(self, context, e)
                raise  # unreachable: abort raises
        except BaseException as e:
            error = e
            raise
        finally:
            record(self, start, context, error)

    return unary


class AutoSegmentServicer(pb_grpc.AutoSegmentServiceServicer):
    def __init__(self, jobs: JobService, info: pb.ServerInfo, limits: RequestLimits, max_message_bytes: int,
                 metrics: Metrics, keys: ApiKeys | None = None) -> None:
        self.jobs = jobs
        self.keys = keys or ApiKeys()
        self.info = info
        self.limits = limits
        self.max_message_bytes = max_message_bytes
        self.metrics = metrics

    def _tenant(self, context: grpc.aio.ServicerContext) -> str:
        """The caller's tenant (the interceptor let only callers with a key through)."""
        tenant = tenant_of(self.keys, context.invocation_metadata())
        if tenant is None:
            raise Unauthenticated(MISSING_KEY)
        return tenant

    def _request(self, request: pb.AutoSegmentRequest, context: grpc.aio.ServicerContext) -> SegmentRequest:
        return replace(to_segment_request(request, self.limits), tenant=self._tenant(context))

    def _response(self, result: JobResult) -> pb.AutoSegmentResponse:
        response = to_response(result, self.info.model)
        size = response.ByteSize()
        if size > self.max_message_bytes:
            raise ResultTooLarge(
                f"the result is {size} bytes, over the {self.max_message_bytes}-byte message limit; ask for fewer "
                "masks (max_masks), no individual mask images (return_individual_masks=false) or JPEG output")
        return response

    @observed
    async def AutoSegment(self, request: pb.AutoSegmentRequest,
                          context: grpc.aio.ServicerContext) -> pb.AutoSegmentResponse:
        return self._response(await self.jobs.run(self._request(request, context)))

    @observed
    async def Submit(self, request: pb.AutoSegmentRequest, context: grpc.aio.ServicerContext) -> pb.SubmitResponse:
        snapshot = await self.jobs.submit(self._request(request, context))
        return pb.SubmitResponse(request_id=snapshot.id, queue_position=snapshot.queue_position)

    @observed
    async def GetStatus(self, request: pb.StatusRequest, context: grpc.aio.ServicerContext) -> pb.RequestStatus:
        return to_status(await self.jobs.status(request.request_id, self._tenant(context)), request.logs)

    @observed
    async def WatchStatus(self, request: pb.StatusRequest,
                          context: grpc.aio.ServicerContext) -> AsyncIterator[pb.RequestStatus]:
        async for snapshot in self.jobs.watch(request.request_id, self._tenant(context)):
            yield to_status(snapshot, request.logs)

    @observed
    async def GetResult(self, request: pb.ResultRequest,
                        context: grpc.aio.ServicerContext) -> pb.AutoSegmentResponse:
        return self._response(await self.jobs.result(request.request_id, self._tenant(context)))

    @observed
    async def Cancel(self, request: pb.CancelRequest, context: grpc.aio.ServicerContext) -> pb.CancelResponse:
        outcome, snapshot = await self.jobs.cancel(request.request_id, self._tenant(context))
        return pb.CancelResponse(outcome=_CANCEL[outcome], status=to_status(snapshot, False))

    @observed
    async def Subscribe(self, request: pb.AutoSegmentRequest,
                        context: grpc.aio.ServicerContext) -> AsyncIterator[pb.SubscribeEvent]:
        async with self.jobs.attached(self._request(request, context)) as job:
            async for snapshot in self.jobs.watch(job.id):
                yield pb.SubscribeEvent(status=to_status(snapshot, True))
            yield pb.SubscribeEvent(result=self._response(await self.jobs.result(job.id)))

    @observed
    async def GetInfo(self, request: pb.GetInfoRequest, context: grpc.aio.ServicerContext) -> pb.ServerInfo:
        return self.info
