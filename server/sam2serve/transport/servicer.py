"""The AutoSegmentService servicer: protobuf in, domain calls, protobuf out; errors through one table."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc

from .. import __version__
from ..errors import InvalidInput, QueueFull, ResultTooLarge, Sam2ServeError, ShuttingDown
from ..grpc_status import status_for
from ..jobs import CancelOutcome, JobQueue, JobSnapshot, JobState
from ..metrics import Metrics
from ..v1 import sam2serve_pb2 as pb
from ..v1 import sam2serve_pb2_grpc as pb_grpc
from .convert import RequestLimits, to_response, to_segment_request, to_status

log = logging.getLogger(__name__)

_CANCEL = {CancelOutcome.CANCELLED_IN_QUEUE: pb.CancelResponse.CANCELLED_IN_QUEUE,
           CancelOutcome.CANCELLING_IN_PROGRESS: pb.CancelResponse.CANCELLING_IN_PROGRESS,
           CancelOutcome.ALREADY_CANCELLED: pb.CancelResponse.ALREADY_CANCELLED,
           CancelOutcome.ALREADY_FINISHED: pb.CancelResponse.ALREADY_FINISHED}


_REJECTION_REASONS = ((QueueFull, "queue_full"), (ShuttingDown, "shutting_down"),
                      (ResultTooLarge, "result_too_large"), (InvalidInput, "invalid_argument"))


async def abort_with(context: grpc.aio.ServicerContext, exc: BaseException, metrics: Metrics) -> None:
    """End the call with the status the error table gives `exc` (counted as a rejection where it is one)."""
    for kind, reason in _REJECTION_REASONS:
        if isinstance(exc, kind):
            metrics.rejected.labels(reason).inc()
            break
    code, message = status_for(exc)
    if code is grpc.StatusCode.INTERNAL:
        log.error("internal error in %s", type(exc).__name__, exc_info=exc)
    await context.abort(code, message)


def observed(rpc: Callable[..., Any]) -> Callable[..., Any]:
    """Count the call by method and final status code, and time it (sam2serve_requests_total, ...)."""
    name = rpc.__name__

    def record(self: Any, start: float, context: grpc.aio.ServicerContext,
               exc: BaseException | None) -> None:
        if exc is None:
            code = "OK"
        elif isinstance(exc, asyncio.CancelledError):
            code = "CANCELLED"
        else:
            got = context.code()
            code = got.name if isinstance(got, grpc.StatusCode) else "UNKNOWN"
        self.metrics.requests.labels(name, code).inc()
        self.metrics.request_seconds.labels(name).observe(time.perf_counter() - start)

    if inspect.isasyncgenfunction(rpc):
        @functools.wraps(rpc)
        async def streaming(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
            start, error = time.perf_counter(), None
            try:
                async for item in rpc(self, request, context):
                    yield item
            except BaseException as e:
                error = e
                raise
            finally:
                record(self, start, context, error)

        return streaming

    @functools.wraps(rpc)
    async def unary(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
        start, error = time.perf_counter(), None
        try:
            return await rpc(self, request, context)
        except BaseException as e:
            error = e
            raise
        finally:
            record(self, start, context, error)

    return unary


class AutoSegmentServicer(pb_grpc.AutoSegmentServiceServicer):
    def __init__(self, queue: JobQueue, info: pb.ServerInfo, limits: RequestLimits,
                 max_message_bytes: int, metrics: Metrics) -> None:
        self.queue = queue
        self.info = info
        self.limits = limits
        self.max_message_bytes = max_message_bytes
        self.metrics = metrics
        self.stopping = False
        self._waiting_calls = 0
        self._calls_changed = asyncio.Condition()

    async def wait_for_waiting_calls(self, timeout_s: float) -> bool:
        """Wait until no AutoSegment/Subscribe call is waiting for its job (True), or the timeout passes."""
        try:
            async with asyncio.timeout(timeout_s), self._calls_changed:
                await self._calls_changed.wait_for(lambda: self._waiting_calls == 0)
            return True
        except TimeoutError:
            return False

    @contextlib.asynccontextmanager
    async def _waiting_call(self) -> AsyncIterator[None]:
        self._waiting_calls += 1
        try:
            yield
        finally:
            self._waiting_calls -= 1
            async with self._calls_changed:
                self._calls_changed.notify_all()

    async def _fail(self, context: grpc.aio.ServicerContext, exc: BaseException) -> None:
        await abort_with(context, exc, self.metrics)

    async def _result(self, job_id: str) -> pb.AutoSegmentResponse:
        snapshot = await self.queue.status(job_id)
        outcome = await self.queue.result(job_id)
        queue_s = (snapshot.started_at or snapshot.submitted_at) - snapshot.submitted_at
        response = to_response(outcome, await self.queue.request(job_id), self.info.model, job_id, queue_s)
        size = response.ByteSize()
        if size > self.max_message_bytes:
            raise ResultTooLarge(
                f"the result is {size} bytes, over the {self.max_message_bytes}-byte message limit; ask for fewer "
                "masks (max_masks), no individual mask images (return_individual_masks=false) or JPEG output")
        return response

    def _status(self, snapshot: JobSnapshot, logs: bool) -> pb.RequestStatus:
        error = None
        if snapshot.state is JobState.FAILED and snapshot.error is not None:
            code, message = status_for(snapshot.error)
            error = (code.value[0], message)
        return to_status(snapshot, logs, error)

    @observed
    async def AutoSegment(self, request: pb.AutoSegmentRequest,
                          context: grpc.aio.ServicerContext) -> pb.AutoSegmentResponse:
        job_id = None
        try:
            async with self._waiting_call():
                segment = to_segment_request(request, self.limits)
                job_id = (await self.queue.submit(segment)).id
                await self.queue.wait(job_id)
                return await self._result(job_id)
        except asyncio.CancelledError:  # the caller left or its deadline passed: stop the work
            if job_id is not None and not self.stopping:
                await asyncio.shield(self.queue.cancel(job_id))
            raise
        except Exception as e:
            await self._fail(context, e)
            raise  # unreachable: abort raises

    @observed
    async def Submit(self, request: pb.AutoSegmentRequest, context: grpc.aio.ServicerContext) -> pb.SubmitResponse:
        try:
            snapshot = await self.queue.submit(to_segment_request(request, self.limits))
        except Exception as e:
            await self._fail(context, e)
            raise
        return pb.SubmitResponse(request_id=snapshot.id, queue_position=snapshot.queue_position)

    @observed
    async def GetStatus(self, request: pb.StatusRequest, context: grpc.aio.ServicerContext) -> pb.RequestStatus:
        try:
            return self._status(await self.queue.status(request.request_id), request.logs)
        except Exception as e:
            await self._fail(context, e)
            raise

    @observed
    async def WatchStatus(self, request: pb.StatusRequest,
                          context: grpc.aio.ServicerContext) -> AsyncIterator[pb.RequestStatus]:
        try:
            async for snapshot in self.queue.watch(request.request_id):
                yield self._status(snapshot, request.logs)
        except Sam2ServeError as e:
            await self._fail(context, e)

    @observed
    async def GetResult(self, request: pb.ResultRequest,
                        context: grpc.aio.ServicerContext) -> pb.AutoSegmentResponse:
        try:
            return await self._result(request.request_id)
        except Exception as e:
            await self._fail(context, e)
            raise

    @observed
    async def Cancel(self, request: pb.CancelRequest, context: grpc.aio.ServicerContext) -> pb.CancelResponse:
        try:
            outcome, snapshot = await self.queue.cancel(request.request_id)
        except Exception as e:
            await self._fail(context, e)
            raise
        return pb.CancelResponse(outcome=_CANCEL[outcome], status=self._status(snapshot, False))

    @observed
    async def Subscribe(self, request: pb.AutoSegmentRequest,
                        context: grpc.aio.ServicerContext) -> AsyncIterator[pb.SubscribeEvent]:
        job_id = None
        try:
            async with self._waiting_call():
                job_id = (await self.queue.submit(to_segment_request(request, self.limits))).id
                async for snapshot in self.queue.watch(job_id):
                    yield pb.SubscribeEvent(status=self._status(snapshot, True))
                yield pb.SubscribeEvent(result=await self._result(job_id))
        except asyncio.CancelledError:
            if job_id is not None and not self.stopping:
                await asyncio.shield(self.queue.cancel(job_id))
            raise
        except Exception as e:
            await self._fail(context, e)

    @observed
    async def GetInfo(self, request: pb.GetInfoRequest, context: grpc.aio.ServicerContext) -> pb.ServerInfo:
        return self.info


def server_info(manifest: object, providers: list[str], backend: str, limits: pb.Limits,
                defaults: pb.GeneratorDefaults) -> pb.ServerInfo:
    m = manifest
    untrained = not m.weights.trained  # type: ignore[attr-defined]
    model = pb.ModelInfo(name=m.model, weights_origin=m.weights.origin, untrained=untrained,  # type: ignore
                         backend=backend, providers=providers)
    warning = ("UNTRAINED WEIGHTS: this server runs randomly initialised engines; its masks are meaningless"
               if untrained else "")
    return pb.ServerInfo(version=__version__, model=model, limits=limits, defaults=defaults, warning=warning)
