"""The PromptSegmentService servicer: protobuf in, `PromptWorkers` calls, protobuf out; errors through the
one table. No queue: calls run at once on the prompt workers (bounded), and a caller that leaves or whose
deadline passes before its turn takes its call out of the waiting line."""

from __future__ import annotations

import grpc

from ..config import ServerConfig
from ..engines import Engine
from ..errors import ResultTooLarge
from ..metrics import Metrics, create_cache_metrics
from ..prompts import ByteBudgetLRU, PromptLimits, PromptSegmenter, PromptWorkers
from ..v1 import sam2serve_pb2 as pb
from ..v1 import sam2serve_pb2_grpc as pb_grpc
from .prompt_convert import to_embed_response, to_image_source, to_prompt_request, to_prompt_response
from .servicer import abort_with, observed


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
        try:
            return to_embed_response(await self.workers.embed(to_image_source(request)), self.model)
        except Exception as e:
            await abort_with(context, e, self.metrics)
            raise  # unreachable: abort raises

    @observed
    async def Segment(self, request: pb.SegmentRequest, context: grpc.aio.ServicerContext) -> pb.SegmentResponse:
        try:
            response = to_prompt_response(await self.workers.segment(to_prompt_request(request)), self.model)
            size = response.ByteSize()
            if size > self.max_message_bytes:
                raise ResultTooLarge(
                    f"the result is {size} bytes, over the {self.max_message_bytes}-byte message limit; ask for "
                    "fewer boxes, multimask_output=false, return_mask_images=false (with return_rle) or JPEG")
            return response
        except Exception as e:
            await abort_with(context, e, self.metrics)
            raise


def attach_prompt_service(server: grpc.aio.Server, config: ServerConfig, engine: Engine, metrics: Metrics,
                          model: pb.ModelInfo) -> PromptWorkers:
    """Build the prompt data plane (cache, segmenter, workers) for `engine` and serve it on `server`."""
    budget = config.embedding_cache_mb * 1024 * 1024
    cache = ByteBudgetLRU(budget, create_cache_metrics(metrics.registry, budget))
    segmenter = PromptSegmenter(engine, cache, config.input_limits(),
                                PromptLimits(max_points=config.max_prompt_points, max_boxes=config.max_prompt_boxes))
    workers = PromptWorkers(segmenter, workers=config.prompt_workers, max_waiting=config.queue_size)
    pb_grpc.add_PromptSegmentServiceServicer_to_server(
        PromptSegmentServicer(workers, model, config.max_message_bytes, metrics), server)
    return workers
