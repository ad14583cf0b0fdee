"""fal's JSON for fal-ai/sam2/auto-segment ↔ the domain: input, output, queue status, errors, webhook bodies.

Input: fal's fields (image_url as an http(s) URL or a data URI, sync_mode, output_format, points_per_side,
pred_iou_thresh, stability_score_thresh, min_mask_region_area) plus our other generator fields and max_masks;
they are checked by sam2serve.request_fields like gRPC's. Output: exactly fal's `combined_mask` and
`individual_masks`, File objects whose url is a data URI with sync_mode, else a URL this server serves.
"""

from __future__ import annotations

import base64
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from ...domain import SegmentOutcome, SegmentRequest
from ...error_table import error_code
from ...errors import InvalidInput, JobCancelled
from ...jobs import JobFinished, JobSnapshot, JobState
from ...outputs.encode import EncodedImage
from ...request_fields import FIELDS, RequestLimits, segment_request

APP_ID = "fal-ai/sam2/auto-segment"
QUEUE_APP = "fal-ai/sam2"  # the clients address a request as <owner>/<alias>/requests/<id>: no endpoint path
FAL_FIELDS = ("image_url", "sync_mode", "output_format", "points_per_side", "pred_iou_thresh",
              "stability_score_thresh", "min_mask_region_area")
OUTPUT_FORMATS = ("png", "jpeg")
ERRORS_DOC = "https://docs.fal.ai/errors"
_STATUS = {JobState.IN_QUEUE: "IN_QUEUE", JobState.IN_PROGRESS: "IN_PROGRESS"}  # anything else is COMPLETED


@dataclass(frozen=True)
class RequestUrls:
    """Where one request is addressed, under `base` (the public URL, or the one the call came in on)."""

    base: str
    request_id: str

    @property
    def response(self) -> str:
        return f"{self.base}/queue/{QUEUE_APP}/requests/{self.request_id}"

    def file(self, file_name: str) -> str:
        return f"{self.base}/files/{self.request_id}/{file_name}"


def to_segment_request(body: object, image: tuple[str, str | bytes] | None, limits: RequestLimits,
                       webhook_url: str, base_url: str) -> SegmentRequest:
    """A request from fal's JSON input; `image` replaces image_url's own (kind, value) when the URL was resolved
    here (an upload to this server)."""
    if not isinstance(body, dict):
        raise InvalidInput(f"the request body must be a JSON object of {APP_ID}'s input, got {type(body).__name__}")
    url = body.get("image_url")
    if not isinstance(url, str) or not url:
        raise InvalidInput("image_url is required: an http(s) URL or a data URI of the image", field="image_url")
    sync_mode = _or_default(body, "sync_mode", False)
    if not isinstance(sync_mode, bool):
        raise InvalidInput(f"sync_mode must be true or false, got {sync_mode!r}", field="sync_mode")
    fmt = _or_default(body, "output_format", "png")
    if fmt not in OUTPUT_FORMATS:
        raise InvalidInput(f"output_format must be one of {', '.join(OUTPUT_FORMATS)}, got {fmt!r}",
                           field="output_format")
    fields = {k: v for k, v in body.items()  # null means "the default", as in fal's schema
              if k not in ("image_url", "sync_mode", "output_format") and v is not None}
    unknown = sorted(set(fields) - set(FIELDS))
    if unknown:
        raise InvalidInput(f"unknown field {unknown[0]!r}: {APP_ID} takes {', '.join(FAL_FIELDS)}, and the "
                           f"generator's {', '.join(f for f in FIELDS if f not in FAL_FIELDS)}", field=unknown[0])
    kind, value = image or (("data_uri", url) if url.startswith("data:") else ("url", url))
    return segment_request(kind, value, fields, limits, fmt=fmt, webhook_url=webhook_url,
                           delivery={"protocol": "fal", "sync_mode": "1" if sync_mode else "", "base_url": base_url})


def _or_default(body: dict, name: str, default: object) -> object:
    value = body.get(name)
    return default if value is None else value


def is_fal(request: SegmentRequest) -> bool:
    return request.delivery.get("protocol") == "fal"


def output(outcome: SegmentOutcome, request: SegmentRequest, urls: RequestUrls) -> dict[str, Any]:
    """fal's output: data URIs with sync_mode, else URLs of this server's /files."""
    inline = bool(request.delivery.get("sync_mode"))

    def file(image: EncodedImage) -> dict[str, Any]:
        return file_object(image, data_uri(image) if inline else urls.file(image.file_name))

    rendered = outcome.rendered
    return {"combined_mask": file(rendered.combined), "individual_masks": [file(i) for i in rendered.individual]}


def file_object(image: EncodedImage, url: str) -> dict[str, Any]:
    """fal's File (an Image: with width and height) for a picture at `url`."""
    return {"url": url, "content_type": image.content_type, "file_name": image.file_name,
            "file_size": image.file_size, "width": image.width, "height": image.height}


def data_uri(image: EncodedImage) -> str:
    return f"data:{image.content_type};base64,{base64.b64encode(image.data).decode()}"


def status(snapshot: JobSnapshot, urls: RequestUrls, with_logs: bool, warning: str = "") -> dict[str, Any]:
    """A queue status: IN_QUEUE (queue_position), IN_PROGRESS (logs, progress) or COMPLETED (logs, metrics with
    the timings; error and error_type when the request failed or was cancelled: its result is that error)."""
    s = snapshot
    body: dict[str, Any] = {"status": _STATUS.get(s.state, "COMPLETED"), "request_id": s.id,
                            "response_url": urls.response, "status_url": urls.response + "/status",
                            "cancel_url": urls.response + "/cancel", "logs": None}
    if with_logs:
        entries = [(s.submitted_at, warning, "WARN")] if warning else []
        entries += [(t, message, "INFO") for t, message in s.logs]
        body["logs"] = [{"message": m, "level": level, "source": "USER", "timestamp": _iso(t)}
                        for t, m, level in entries]
    if s.state is JobState.IN_QUEUE:
        body["queue_position"] = s.queue_position
    elif s.state is JobState.IN_PROGRESS:
        body["progress"] = s.progress
    else:
        started = s.started_at or s.finished_at or s.submitted_at
        body["metrics"] = {"inference_time": (s.finished_at or started) - started if s.started_at else None,
                           "queue_time": started - s.submitted_at}
        error = s.error if s.state is JobState.FAILED else (
            JobCancelled(f"request {s.id} was cancelled") if s.state is JobState.CANCELLED else None)
        if error is not None:
            code, message = error_code(error)
            body["error"], body["error_type"] = message, code.fal_type
    return body


def error(exc: BaseException) -> tuple[int, dict[str, Any], dict[str, str]]:
    """(HTTP status, body, headers) in fal's shapes: a bad input is 422 with `detail` a list of
    {loc, msg, type, url}; anything else `detail` a message and `error_type`."""
    code, message = error_code(exc)
    headers = {"x-fal-error-type": code.fal_type, "x-fal-retryable": "true" if code.http in (429, 503) else "false"}
    if isinstance(exc, InvalidInput):
        loc = ["query", "fal_webhook"] if exc.field == "webhook_url" else ["body", *([exc.field] if exc.field else [])]
        detail = [{"loc": loc, "msg": message, "type": code.fal_type,
                   "url": f"{ERRORS_DOC}#{code.fal_type}"}]
        return code.http, {"detail": detail}, headers
    return code.http, {"detail": message, "error_type": code.fal_type}, headers


def job_error(exc: BaseException) -> BaseException:
    """A job's error as the HTTP API reports it: input errors of a run are about its image, the only input
    the job checks itself."""
    if isinstance(exc, InvalidInput) and exc.field is None:
        return type(exc)(str(exc), field="image_url")
    return exc


def webhook_body(job: JobFinished) -> dict[str, Any]:
    """fal's webhook body: request_id, gateway_request_id, status OK with the output as payload, or ERROR with
    the error's body as payload and `error` saying what fal says ("Invalid status code: <HTTP status>")."""
    urls = RequestUrls(job.request.delivery.get("base_url", ""), job.id)
    body: dict[str, Any] = {"request_id": job.id, "gateway_request_id": job.id}
    if job.state is JobState.COMPLETED and job.outcome is not None:
        return {**body, "status": "OK", "payload": output(job.outcome, job.request, urls), "error": None}
    failure = job.error if job.error is not None else JobCancelled(f"request {job.id} was cancelled")
    http_status, payload, _ = error(job_error(failure))
    return {**body, "status": "ERROR", "payload": payload, "error": f"Invalid status code: {http_status}"}


def file_named(outcome: SegmentOutcome, file_name: str) -> EncodedImage | None:
    rendered = outcome.rendered
    for image in (rendered.combined, *rendered.individual, *([rendered.overlay] if rendered.overlay else [])):
        if image.file_name == file_name:
            return image
    return None


def seconds_left(finished_at: float | None, ttl_s: float, now: Callable[[], float] = time.time) -> int:
    """How long a finished request's files stay available (for Cache-Control)."""
    return max(0, int((finished_at or now()) + ttl_s - now()))


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).isoformat()

