"""The work of one segmentation job, as plain Python in two stages that the job worker runs in order:
`fetch` (the image: fetched, parsed, checked against the limits, decoded) and `compute` (the generator, then
the pictures). Both run in worker threads, never on the event loop."""

from __future__ import annotations

import time
from dataclasses import dataclass

from .amg import AutoMaskGenerator
from .domain import JobControl, SegmentOutcome, SegmentRequest, Timings
from .inputs import InputLimits, LoadedImage, load_image
from .outputs import render_outputs


@dataclass(frozen=True)
class FetchedImage:
    image: LoadedImage
    seconds: float  # the "image" stage


class SegmentPipeline:
    """The job runner of automatic segmentation (`jobs.Runner`)."""

    def __init__(self, generator: AutoMaskGenerator, limits: InputLimits) -> None:
        self.generator = generator
        self.limits = limits

    def fetch(self, request: SegmentRequest, control: JobControl) -> FetchedImage:
        start = time.perf_counter()
        image = load_image(request.image_kind, request.image_value, self.limits)
        seconds = time.perf_counter() - start
        control.log(f"image: {image.format} {image.width}x{image.height}, {image.byte_count} bytes")
        return FetchedImage(image, seconds)

    def compute(self, request: SegmentRequest, fetched: FetchedImage, control: JobControl) -> SegmentOutcome:
        rgb = fetched.image.rgb
        result = self.generator.generate(rgb, request.params, control)
        control.log(f"{len(result.records)} masks from {result.counts.get('candidates', 0)} candidates")
        start = time.perf_counter()
        out = request.output
        rendered = render_outputs(result, rgb, out.fmt, include_individual=out.individual_masks,
                                  max_masks=out.max_masks, include_overlay=out.overlay)
        output_s = time.perf_counter() - start + result.timings.get("encoding", 0.0)
        timings = Timings(image=fetched.seconds, encoder=result.timings["encoder"],
                          decoder=result.timings["decoder"], postprocess=result.timings["postprocess"],
                          output=output_s)
        return SegmentOutcome(result, rendered, (fetched.image.height, fetched.image.width), timings)
