"""Protobuf ↔ domain objects; request fields are validated by sam2serve.request_fields, shared by every protocol."""

from __future__ import annotations

from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp

from .. import __version__
from ..amg.params import GeneratorParams, fal_defaults
from ..app import App
from ..domain import SegmentRequest
from ..engines.base import UNTRAINED_WARNING
from ..errors import InvalidInput
from ..grpc_status import status_for
from ..jobs import JobResult, JobSnapshot, JobState
from ..outputs.encode import EncodedImage
from ..request_fields import FIELDS, RequestLimits, segment_request
from ..v1 import sam2serve_pb2 as pb

_KIND_NAMES = {"image_url": "url", "image_data_uri": "data_uri", "image_bytes": "bytes"}
_OUTPUT_FORMATS: dict[int, str] = {pb.OUTPUT_FORMAT_UNSPECIFIED: "png", pb.OUTPUT_FORMAT_PNG: "png",
                                   pb.OUTPUT_FORMAT_JPEG: "jpeg", pb.OUTPUT_FORMAT_WEBP: "webp"}


def output_format(value: int) -> str:
    if value not in _OUTPUT_FORMATS:
        raise InvalidInput(f"output_format {value} is not one of {sorted(_OUTPUT_FORMATS)}", field="output_format")
    return _OUTPUT_FORMATS[value]


def image_field(msg: Any) -> tuple[str, str | bytes]:
    """The field set in a request's `image` oneof and its value; InvalidInput when none is set or it is empty."""
    kind = msg.WhichOneof("image")
    if kind is None:
        names = [f.name for f in msg.DESCRIPTOR.oneofs_by_name["image"].fields]
        raise InvalidInput(f"no image in the request: set one of {', '.join(names[:-1])} or {names[-1]}",
                           field="image")
    value = getattr(msg, kind)
    if not value:
        raise InvalidInput(f"{kind} is empty", field=kind)
    return kind, value


def to_segment_request(msg: pb.AutoSegmentRequest, limits: RequestLimits,
                       defaults: GeneratorParams | None = None) -> SegmentRequest:
    kind, value = image_field(msg)
    fields = {name: getattr(msg, name) for name in FIELDS if msg.HasField(name)}
    return segment_request(
        _KIND_NAMES[kind], value, fields, limits, defaults=defaults, fmt=output_format(msg.output_format),
        individual_masks=msg.return_individual_masks if msg.HasField("return_individual_masks") else True,
        rle=msg.return_rle, overlay=msg.return_overlay, webhook_url=msg.webhook_url)


def generator_defaults(params: GeneratorParams) -> pb.GeneratorDefaults:
    names = set(pb.GeneratorDefaults.DESCRIPTOR.fields_by_name)
    return pb.GeneratorDefaults(**{k: v for k, v in params.__dict__.items() if k in names})


def server_info(app: App) -> pb.ServerInfo:
    config, manifest, engine = app.config, app.manifest, app.engine.info
    model = pb.ModelInfo(name=manifest.model, weights_origin=manifest.weights.origin, untrained=not engine.trained,
                         backend=engine.backend, providers=list(engine.providers),
                         encoder_precision=engine.encoder_precision)
    limits = pb.Limits(max_image_bytes=config.max_image_bytes, max_image_pixels=config.max_image_pixels,
                       max_points_per_side=config.max_points_per_side, max_crop_n_layers=config.max_crop_n_layers,
                       queue_size=config.queue_size, workers=config.workers,
                       max_message_bytes=config.max_message_bytes, result_ttl_seconds=config.result_ttl_seconds,
                       max_prompt_points=config.max_prompt_points, max_prompt_boxes=config.max_prompt_boxes,
                       embedding_cache_bytes=config.embedding_cache_mb * 1024 * 1024,
                       max_decoder_prompts=config.max_decoder_prompts,
                       job_time_limit_seconds=config.job_time_limit_seconds,
                       queue_image_bytes=config.queue_image_bytes, max_status_streams=config.max_status_streams)
    return pb.ServerInfo(version=__version__, model=model, limits=limits, defaults=generator_defaults(fal_defaults()),
                         warning="" if engine.trained else UNTRAINED_WARNING)


def to_image(e: EncodedImage) -> pb.Image:
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
    response = pb.AutoSegmentResponse(combined_mask=to_image(rendered.combined),
                                      individual_masks=[to_image(i) for i in rendered.individual], masks=masks,
                                      timings=timings, model=model, total_masks=len(outcome.result.records),
                                      request_id=request_id)
    if rendered.overlay is not None:
        response.overlay.CopyFrom(to_image(rendered.overlay))
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
