"""PromptSegmentService protobuf ↔ the transport-free `sam2serve.prompts` types."""

from __future__ import annotations

from ..prompts import BoxPrompt, EmbeddedImage, ImageSource, MaskOutputs, PointPrompt, PromptOutcome, PromptRequest
from ..prompts.model import FOREGROUND
from ..v1 import sam2serve_pb2 as pb
from .convert import image_field, output_format, to_image

_SOURCE_KINDS = {"image_url": "url", "image_data_uri": "data_uri", "image_bytes": "bytes", "image_id": "image_id"}


def to_image_source(msg: pb.EmbedImageRequest | pb.SegmentRequest) -> ImageSource:
    kind, value = image_field(msg)
    return ImageSource(_SOURCE_KINDS[kind], value)


def to_prompt_request(msg: pb.SegmentRequest) -> PromptRequest:
    return PromptRequest(
        image=to_image_source(msg),
        points=tuple(PointPrompt(p.x, p.y, p.label if p.HasField("label") else FOREGROUND) for p in msg.points),
        boxes=tuple(BoxPrompt(b.x_min, b.y_min, b.x_max, b.y_max) for b in msg.boxes),
        mask_input_id=msg.mask_input_id,
        multimask=msg.multimask_output if msg.HasField("multimask_output") else True,
        outputs=MaskOutputs(fmt=output_format(msg.output_format),
                            images=msg.return_mask_images if msg.HasField("return_mask_images") else True,
                            rle=msg.return_rle),
    )


def _timings(timings: dict[str, float]) -> pb.StageTimings:
    t = {stage: timings.get(stage, 0.0) for stage in ("image", "encoder", "decoder", "postprocess", "output")}
    return pb.StageTimings(image_seconds=t["image"], encoder_seconds=t["encoder"], decoder_seconds=t["decoder"],
                           postprocess_seconds=t["postprocess"], output_seconds=t["output"],
                           total_seconds=sum(t.values()))


def to_embed_response(image: EmbeddedImage, model: pb.ModelInfo) -> pb.EmbedImageResponse:
    return pb.EmbedImageResponse(image_id=image.image_id, width=image.width, height=image.height,
                                 cached=image.cached, model=model, timings=_timings(image.timings))


def to_prompt_response(outcome: PromptOutcome, model: pb.ModelInfo) -> pb.SegmentResponse:
    results = []
    for result in outcome.results:
        masks = []
        for m in result.masks:
            mask = pb.PromptMask(index=m.index, score=m.score, area=m.area, bbox=m.bbox, logits_id=m.logits_id)
            if m.image is not None:
                mask.image.CopyFrom(to_image(m.image))
            if m.rle is not None:
                mask.rle.CopyFrom(pb.Rle(size=list(m.rle["size"]), counts=str(m.rle["counts"])))
            masks.append(mask)
        results.append(pb.PromptSetResult(masks=masks, best_index=result.best_index))
    image = outcome.image
    return pb.SegmentResponse(image_id=image.image_id, width=image.width, height=image.height, cached=image.cached,
                              results=results, model=model, timings=_timings(outcome.timings))
