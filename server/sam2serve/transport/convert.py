"""Protobuf ↔ domain objects. Validation of request fields lives here, with messages naming the field."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp

from .. import __version__
from ..amg.params import GeneratorParams, fal_defaults
from ..app import App
from ..domain import OutputOptions, SegmentRequest
from ..engines.base import UNTRAINED_WARNING
from ..errors import InvalidInput
from ..grpc_status import status_for
from ..jobs import JobResult, JobSnapshot, JobState
from ..outputs.encode import EncodedImage
from ..v1 import sam2serve_pb2 as pb


@dataclass(frozen=True)
class RequestLimits:
    max_points_per_side: int = 64
    max_crop_n_layers: int = 3
    max_points_per_batch: int = 1024


# field: (type, minimum, maximum); a maximum of 0 is taken from RequestLimits
_RANGES: dict[str, tuple[type, float, float]] = {
    "points_per_side": (int, 1, 0),  # maximum from RequestLimits
    "pred_iou_thresh": (float, 0.0, 1.0),
    "stability_score_thresh": (float, 0.0, 1.0),
    "min_mask_region_area": (int, 0, 256 * 256),
    "points_per_batch": (int, 1, 0),
    "box_nms_thresh": (float, 0.0, 1.0),
    "crop_n_layers": (int, 0, 0),
    "crop_nms_thresh": (float, 0.0, 1.0),
    "crop_overlap_ratio": (float, 0.0, 0.99),
    "crop_n_points_downscale_factor": (int, 1, 16),
    "stability_score_offset": (float, 0.0, 32.0),
    "mask_threshold": (float, -32.0, 32.0),
    "output_min_region_area": (int, 0, 100_000_000),
}
_BOOLS = ("use_m2m", "multimask_output")


def to_segment_request(msg: pb.AutoSegmentRequest, limits: RequestLimits,
                       defaults: GeneratorParams | None = None) -> SegmentRequest:
    kind = msg.WhichOneof("image")
    if kind is None:
        raise InvalidInput("no image in the request: set one of image_url, image_data_uri or image_bytes")
    value = getattr(msg, kind)
    if not value:
        raise InvalidInput(f"{kind} is empty")
    maxima = {"points_per_side": limits.max_points_per_side, "crop_n_layers": limits.max_crop_n_layers,
              "points_per_batch": limits.max_points_per_batch}
    overrides: dict[str, Any] = {}
    for name, (kind_of, low, high) in _RANGES.items():
        if not msg.HasField(name):
            continue
        value_of = getattr(msg, name)
        high = maxima.get(name, high)
        if isinstance(value_of, float) and not math.isfinite(value_of):
            raise InvalidInput(f"{name} must be a finite number, got {value_of}")
        if not low <= value_of <= high:
            raise InvalidInput(f"{name} must be between {low} and {high}, got {value_of:g}")
        overrides[name] = kind_of(value_of)
    for name in _BOOLS:
        if msg.HasField(name):
            overrides[name] = getattr(msg, name)
    params = replace(defaults or fal_defaults(), **overrides)
    if msg.HasField("max_masks") and msg.max_masks < 0:
        raise InvalidInput(f"max_masks must be 0 or more, got {msg.max_masks}")
    output = OutputOptions(
        fmt="jpeg" if msg.output_format == pb.OUTPUT_FORMAT_JPEG else "png",
        individual_masks=msg.return_individual_masks if msg.HasField("return_individual_masks") else True,
        rle=msg.return_rle,
        overlay=msg.return_overlay,
        max_masks=msg.max_masks if msg.HasField("max_masks") else None,
    )
    if msg.webhook_url and not msg.webhook_url.startswith(("http://", "https://")):
        raise InvalidInput(f"webhook_url must be an http or https URL, got {msg.webhook_url[:60]!r}")
    kind_name = {"image_url": "url", "image_data_uri": "data_uri", "image_bytes": "bytes"}[kind]
    return SegmentRequest(kind_name, value, params, output, msg.webhook_url)


def generator_defaults(params: GeneratorParams) -> pb.GeneratorDefaults:
    names = set(pb.GeneratorDefaults.DESCRIPTOR.fields_by_name)
    return pb.GeneratorDefaults(**{k: v for k, v in params.__dict__.items() if k in names})


def server_info(app: App) -> pb.ServerInfo:
    config, manifest, engine = app.config, app.manifest, app.engine.info
    model = pb.ModelInfo(name=manifest.model, weights_origin=manifest.weights.origin, untrained=not engine.trained,
                         backend=engine.backend, providers=list(engine.providers))
    limits = pb.Limits(max_image_bytes=config.max_image_bytes, max_image_pixels=config.max_image_pixels,
                       max_points_per_side=config.max_points_per_side, max_crop_n_layers=config.max_crop_n_layers,
                       queue_size=config.queue_size, workers=config.workers,
                       max_message_bytes=config.max_message_bytes, result_ttl_seconds=config.result_ttl_seconds)
    return pb.ServerInfo(version=__version__, model=model, limits=limits, defaults=generator_defaults(fal_defaults()),
                         warning="" if engine.trained else UNTRAINED_WARNING)


def _image(e: EncodedImage) -> pb.Image:
    return pb.Image(data=e.data, content_type=e.content_type, file_name=e.file_name, file_size=e.file_size,
                    width=e.width, height=e.height)


def to_response(result: JobResult, model: pb.ModelInfo) -> pb.AutoSegmentResponse:
    outcome, request, request_id, queue_s = result.outcome, result.request, result.id, result.queue_seconds
    rendered = outcome.rendered
    records = outcome.result.records[: rendered.mask_count]
    masks = []
    for i, r in enumerate(records):
        meta = pb.MaskMetadata(index=i, area=r.area, bbox=[int(v) for v in r.bbox], predicted_iou=r.predicted_iou,
                               stability_score=r.stability_score,
                               point_coords=[pb.Point(x=p[0], y=p[1]) for p in r.point_coords],
                               crop_box=[int(v) for v in r.crop_box])
        if request.output.rle:
            meta.rle.CopyFrom(pb.Rle(size=list(r.rle["size"]), counts=str(r.rle["counts"])))
        masks.append(meta)
    t = outcome.timings
    timings = pb.StageTimings(queue_seconds=queue_s, image_seconds=t["image"], encoder_seconds=t["encoder"],
                              decoder_seconds=t["decoder"], postprocess_seconds=t["postprocess"],
                              output_seconds=t["output"],
                              total_seconds=queue_s + (t["image"] + t["encoder"] + t["decoder"] + t["postprocess"]
                                                       + t["output"]))
    response = pb.AutoSegmentResponse(combined_mask=_image(rendered.combined),
                                      individual_masks=[_image(i) for i in rendered.individual], masks=masks,
                                      timings=timings, model=model, total_masks=len(outcome.result.records),
                                      request_id=request_id)
    if rendered.overlay is not None:
        response.overlay.CopyFrom(_image(rendered.overlay))
    return response


_STATE = {JobState.IN_QUEUE: pb.RequestStatus.IN_QUEUE, JobState.IN_PROGRESS: pb.RequestStatus.IN_PROGRESS,
          JobState.COMPLETED: pb.RequestStatus.COMPLETED, JobState.FAILED: pb.RequestStatus.FAILED,
          JobState.CANCELLED: pb.RequestStatus.CANCELLED}


def _ts(seconds: float | None) -> Timestamp | None:
    if seconds is None:
        return None
    ts = Timestamp()
    ts.FromNanoseconds(int(seconds * 1e9))
    return ts


def to_status(s: JobSnapshot, with_logs: bool) -> pb.RequestStatus:
    status = pb.RequestStatus(request_id=s.id, state=_STATE[s.state], progress=s.progress,
                              queue_position=s.queue_position if s.state is JobState.IN_QUEUE else 0)
    for field_name, value in (("submitted_at", s.submitted_at), ("started_at", s.started_at),
                              ("finished_at", s.finished_at)):
        ts = _ts(value)
        if ts is not None:
            getattr(status, field_name).CopyFrom(ts)
    if with_logs:
        status.logs.extend(pb.LogEntry(timestamp=_ts(t), message=m) for t, m in s.logs)
    if s.state is JobState.FAILED and s.error is not None:
        code, message = status_for(s.error)
        status.error_code, status.error = code.value[0], message
    return status
