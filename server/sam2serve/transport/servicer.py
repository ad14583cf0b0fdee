"""The AutoSegmentService servicer: protobuf in, domain calls, protobuf out; errors through one table."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import grpc

from .. import __version__
from ..errors import ResultTooLarge, Sam2ServeError
from ..grpc_status import status_for
from ..jobs import CancelOutcome, InProcessJobQueue, JobSnapshot, JobState
from ..v1 import sam2serve_pb2 as pb
from ..v1 import sam2serve_pb2_grpc as pb_grpc
from .convert import RequestLimits, to_response, to_segment_request, to_status

log = logging.getLogger(__name__)

_CANCEL = {CancelOutcome.CANCELLED_IN_QUEUE: pb.CancelResponse.CANCELLED_IN_QUEUE,
           CancelOutcome.CANCELLING_IN_PROGRESS: pb.CancelResponse.CANCELLING_IN_PROGRESS,
           CancelOutcome.ALREADY_CANCELLED: pb.CancelResponse.ALREADY_CANCELLED,
           CancelOutcome.ALREADY_FINISHED: pb.CancelResponse.ALREADY_FINISHED}


class AutoSegmentServicer(pb_grpc.AutoSegmentServiceServicer):
    def __init__(self, queue: InProcessJobQueue, info: pb.ServerInfo, limits: RequestLimits,
                 max_message_bytes: int) -> None:
        self.queue = queue
        self.info = info
        self.limits = limits
        self.max_message_bytes = max_message_bytes

    async def _fail(self, context: grpc.aio.ServicerContext, exc: BaseException) -> None:
        code, message = status_for(exc)
        if code is grpc.StatusCode.INTERNAL:
            log.error("internal error in %s", type(exc).__name__, exc_info=exc)
        await context.abort(code, message)

    def _result(self, job_id: str) -> pb.AutoSegmentResponse:
        snapshot = self.queue.status(job_id)
        outcome = self.queue.result(job_id)
        queue_s = (snapshot.started_at or snapshot.submitted_at) - snapshot.submitted_at
        response = to_response(outcome, self.queue.request(job_id), self.info.model, job_id, queue_s)
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

    async def AutoSegment(self, request: pb.AutoSegmentRequest,
                          context: grpc.aio.ServicerContext) -> pb.AutoSegmentResponse:
        job_id = None
        try:
            segment = to_segment_request(request, self.limits)
            job_id = (await self.queue.submit(segment)).id
            await self.queue.wait(job_id)
            return self._result(job_id)
        except asyncio.CancelledError:  # the caller left or its deadline passed: stop the work
            if job_id is not None:
                self.queue.cancel(job_id)
            raise
        except Exception as e:
            await self._fail(context, e)
            raise  # unreachable: abort raises

    async def Submit(self, request: pb.AutoSegmentRequest, context: grpc.aio.ServicerContext) -> pb.SubmitResponse:
        try:
            snapshot = await self.queue.submit(to_segment_request(request, self.limits))
        except Exception as e:
            await self._fail(context, e)
            raise
        return pb.SubmitResponse(request_id=snapshot.id, queue_position=snapshot.queue_position)

    async def GetStatus(self, request: pb.StatusRequest, context: grpc.aio.ServicerContext) -> pb.RequestStatus:
        try:
            return self._status(self.queue.status(request.request_id), request.logs)
        except Exception as e:
            await self._fail(context, e)
            raise

    async def WatchStatus(self, request: pb.StatusRequest,
                          context: grpc.aio.ServicerContext) -> AsyncIterator[pb.RequestStatus]:
        try:
            async for snapshot in self.queue.watch(request.request_id):
                yield self._status(snapshot, request.logs)
        except Sam2ServeError as e:
            await self._fail(context, e)

    async def GetResult(self, request: pb.ResultRequest,
                        context: grpc.aio.ServicerContext) -> pb.AutoSegmentResponse:
        try:
            return self._result(request.request_id)
        except Exception as e:
            await self._fail(context, e)
            raise

    async def Cancel(self, request: pb.CancelRequest, context: grpc.aio.ServicerContext) -> pb.CancelResponse:
        try:
            outcome, snapshot = self.queue.cancel(request.request_id)
        except Exception as e:
            await self._fail(context, e)
            raise
        return pb.CancelResponse(outcome=_CANCEL[outcome], status=self._status(snapshot, False))

    async def Subscribe(self, request: pb.AutoSegmentRequest,
                        context: grpc.aio.ServicerContext) -> AsyncIterator[pb.SubscribeEvent]:
        job_id = None
        try:
            job_id = (await self.queue.submit(to_segment_request(request, self.limits))).id
            async for snapshot in self.queue.watch(job_id):
                yield pb.SubscribeEvent(status=self._status(snapshot, True))
            yield pb.SubscribeEvent(result=self._result(job_id))
        except asyncio.CancelledError:
            if job_id is not None:
                self.queue.cancel(job_id)
            raise
        except Exception as e:
            await self._fail(context, e)

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
