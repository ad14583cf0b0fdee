"""The data plane: one segmentation request, start to finish, as plain Python (runs in a worker thread)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from .amg import AutoMaskGenerator, GenerationResult, GeneratorParams
from .inputs import InputLimits, load_image
from .outputs import RenderedOutputs, render_outputs


@dataclass(frozen=True)
class OutputOptions:
    fmt: str = "png"
    individual_masks: bool = True
    rle: bool = False
    overlay: bool = False
    max_masks: int | None = None


@dataclass(frozen=True)
class SegmentRequest:
    image_kind: str  # "url", "data_uri" or "bytes"
    image_value: str | bytes
    params: GeneratorParams
    output: OutputOptions = OutputOptions()
    webhook_url: str = ""
    # How the protocol that took the request answers it (e.g. fal's sync_mode and file URLs): set by the
    # transport, carried by the job layer untouched, read back by the same transport and by notifications.
    delivery: dict[str, str] = field(default_factory=dict)


@dataclass
class SegmentOutcome:
    result: GenerationResult
    rendered: RenderedOutputs
    image_hw: tuple[int, int]
    timings: dict[str, float] = field(default_factory=dict)


def run_segment(
    request: SegmentRequest,
    generator: AutoMaskGenerator,
    limits: InputLimits,
    should_stop: Callable[[], bool] = lambda: False,
    on_progress: Callable[[int, int], None] | None = None,
    log: Callable[[str], None] = lambda message: None,
) -> SegmentOutcome:
    start = time.perf_counter()
    image = load_image(request.image_kind, request.image_value, limits)
    image_s = time.perf_counter() - start
    log(f"image: {image.format} {image.width}x{image.height}, {image.byte_count} bytes")
    result = generator.generate(image.rgb, request.params, should_stop=should_stop, on_progress=on_progress)
    log(f"{len(result.records)} masks from {result.counts.get('candidates', 0)} candidates")
    start = time.perf_counter()
    out = request.output
    rendered = render_outputs(result, image.rgb, out.fmt, include_individual=out.individual_masks,
                              max_masks=out.max_masks, include_overlay=out.overlay)
    output_s = time.perf_counter() - start + result.timings.get("encoding", 0.0)
    timings = {"image": image_s, "encoder": result.timings["encoder"], "decoder": result.timings["decoder"],
               "postprocess": result.timings["postprocess"], "output": output_s}
    return SegmentOutcome(result, rendered, (image.height, image.width), timings)
