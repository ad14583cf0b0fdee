"""The pictures the API returns for a generation result, like fal-ai/sam2/auto-segment's outputs.

`render_outputs` makes `combined_mask` (every mask in its palette colour on black), optionally one binary
picture per mask (`individual_masks`, named mask_000.png, mask_001.png, ... in response order) and,
only when asked, an overlay of the masks on the photo for humans to look at. No gRPC here.

Response order is the order of `GenerationResult.records`; `max_masks` keeps the first `max_masks` of
them and drops the rest, from the combined mask and the overlay as well as from the individual masks, so
the i-th individual mask always has the i-th palette colour. Sort the records before rendering if another
order (e.g. by area or score) should decide which masks survive.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np

from ..domain import GenerationResult
from .encode import DEFAULT_JPEG_QUALITY, EncodedImage, encode_image, normalise_format
from .palette import colour_for, palette_lut
from .render import combined_and_overlay, combined_mask, individual_mask, overlay, paint_order

__all__ = [
    "EncodedImage",
    "RenderedOutputs",
    "colour_for",
    "combined_and_overlay",
    "combined_mask",
    "encode_image",
    "individual_mask",
    "overlay",
    "paint_order",
    "palette_lut",
    "render_outputs",
]


@dataclass(frozen=True)
class RenderedOutputs:
    combined: EncodedImage
    individual: list[EncodedImage]  # empty unless include_individual; mask_000.<ext>, ... in response order
    overlay: EncodedImage | None  # only with include_overlay
    mask_count: int  # masks rendered
    dropped: int  # masks beyond max_masks, left out of every picture
    timings: dict[str, float] = field(default_factory=dict)  # seconds: "render", "encode"


def render_outputs(result: GenerationResult, image_rgb: np.ndarray | None, fmt: str = "png",
                   include_individual: bool = True, max_masks: int | None = None, *,
                   include_overlay: bool = False, jpeg_quality: int = DEFAULT_JPEG_QUALITY) -> RenderedOutputs:
    """Encoded pictures of `result` in `fmt` ('png', 'jpeg' or 'webp'; JPEG is lossy, also for binary masks).

    `image_rgb` (HxWx3 uint8, the image the masks were generated from) is needed only for the overlay.
    `max_masks` (None: no limit) keeps the first `max_masks` records in response order.
    """
    fmt = normalise_format(fmt)
    if max_masks is not None and max_masks < 0:
        raise ValueError(f"max_masks must be >= 0 or None, got {max_masks}")
    height, width = (int(v) for v in result.image_size)
    records = result.records if max_masks is None else result.records[:max_masks]
    if include_overlay:
        if image_rgb is None:
            raise ValueError("the overlay needs the image the masks were generated from")
        if tuple(np.shape(image_rgb)[:2]) != (height, width):
            raise ValueError(f"image is {np.shape(image_rgb)[:2]}, the result is for {(height, width)}")
    timings = {"render": 0.0, "encode": 0.0}
    blended = None
    if include_overlay:
        with _timed(timings, "render"):
            picture, over = combined_and_overlay(image_rgb, records)  # type: ignore[arg-type]
        with _timed(timings, "encode"):
            blended = encode_image(over, fmt, "overlay", jpeg_quality)
        del over
    else:
        with _timed(timings, "render"):
            picture = combined_mask(records, (height, width))
    with _timed(timings, "encode"):
        combined = encode_image(picture, fmt, "combined_mask", jpeg_quality)
    del picture
    individual = []
    if include_individual:
        for i, record in enumerate(records):  # one decoded mask at a time
            with _timed(timings, "render"):
                mask = individual_mask(record)
            with _timed(timings, "encode"):
                individual.append(encode_image(mask, fmt, f"mask_{i:03d}", jpeg_quality))
            del mask
    return RenderedOutputs(combined=combined, individual=individual, overlay=blended, mask_count=len(records),
                           dropped=len(result.records) - len(records), timings=timings)


@contextmanager
def _timed(timings: dict[str, float], stage: str) -> Iterator[None]:
    start = time.perf_counter()
    try:
        yield
    finally:
        timings[stage] += time.perf_counter() - start
