"""Fakes for the job layer's tests: outcomes and requests without an engine, and a runner made of one
function `(request, control) -> outcome` that the worker runs as its compute stage."""

from __future__ import annotations

from collections.abc import Callable

from sam2serve.amg.params import GeneratorParams
from sam2serve.domain import GenerationResult, JobControl, MaskRecord, SegmentOutcome, SegmentRequest
from sam2serve.jobs import JobService, JobStore, Worker
from sam2serve.outputs import RenderedOutputs
from sam2serve.outputs.encode import EncodedImage

Work = Callable[[SegmentRequest, JobControl], SegmentOutcome]


def outcome(n_masks: int = 2) -> SegmentOutcome:
    records = [MaskRecord(rle={"size": [4, 6], "counts": b"3" * (i + 1)}, area=5 + i, bbox=[0, 1, 2, 3],
                          predicted_iou=0.9, stability_score=0.97, point_coords=[[1.5, 2.0]], crop_box=[0, 0, 6, 4])
               for i in range(n_masks)]
    image = EncodedImage(data=b"\x89PNG\x00\xff", content_type="image/png", file_name="mask.png", file_size=6,
                         width=6, height=4)
    rendered = RenderedOutputs(combined=image, individual=[image] * n_masks, overlay=None, mask_count=n_masks,
                               dropped=0, timings={"render": 0.1})
    result = GenerationResult(records, (4, 6), {"encoder": 1.0}, {"candidates": 3})
    return SegmentOutcome(result, rendered, (4, 6), {"total": 1.5})


def request(webhook_url: str = "") -> SegmentRequest:
    return SegmentRequest("bytes", b"image", GeneratorParams(), webhook_url=webhook_url)


class OneStage:
    """A `jobs.Runner` whose fetch stage does nothing and whose compute stage is `work`."""

    def __init__(self, work: Work) -> None:
        self.work = work

    def fetch(self, request: SegmentRequest, control: JobControl) -> None:
        return None

    def compute(self, request: SegmentRequest, fetched: None, control: JobControl) -> SegmentOutcome:
        return self.work(request, control)


def service(store: JobStore, work: Work, workers: int = 1, time_limit_s: float = 0.0) -> JobService:
    return JobService(store, Worker(store, OneStage(work), workers=workers, time_limit_s=time_limit_s))


def url_request(url: str = "https://example.com/slow.png") -> SegmentRequest:
    return SegmentRequest("url", url, GeneratorParams())
