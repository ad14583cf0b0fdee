"""The PromptSegmentService servicer: protobuf in, `PromptWorkers` calls, protobuf out; errors become a
status in `observed`, as for every RPC. No queue: calls run at once on the prompt workers (bounded), and a
caller that leaves or whose deadline passes before its turn takes its call out of the waiting line."""

from __future__ import annotations

import grpc

from ..errors import ResultTooLarge
from ..metrics import Metrics
from ..prompts import PromptWorkers
from ..v1 import sam2serve_pb2 as pb
from ..v1 import sam2serve_pb2_grpc as pb_grpc
from .prompt_convert import to_embed_response, to_image_source, to_prompt_request, to_prompt_response
from .servicer import observed


class PromptSegmentServicer(pb_grpc.PromptSegmentServiceServicer):
    def __init__(self, workers: PromptWorkers, model: pb.ModelInfo, max_message_bytes: int,
                 metrics: Metrics) -> None:
        self.workers = workers
        self.model = model
        self.max_message_bytes = max_message_bytes
        self.metrics = metrics

    @observed
    async def EmbedImage(self, request: pb.EmbedImageRequest,
                         context: grpc.aio.ServicerContext) -> pb.EmbedImageResponse:
        return to_embed_response(await self.workers.embed(to_image_source(request)), self.model)

    @observed
    async def Segment(self, request: pb.SegmentRequest, context: grpc.aio.ServicerContext) -> pb.SegmentResponse:
        response = to_prompt_response(await self.workers.segment(to_prompt_request(request)), self.model)
        size = response.ByteSize()
        if size > self.max_message_bytes:
            raise ResultTooLarge(
                f"the result is {size} bytes, over the {self.max_message_bytes}-byte message limit; ask for fewer "
                "boxes, multimask_output=false, return_mask_images=false (with return_rle) or JPEG")
        return response
