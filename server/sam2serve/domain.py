"""The bottom floor: what a segmentation request, its records and its outcome are, the stage names, and how
running work is steered (`JobControl`). Every other layer (generator, pipeline, jobs, codec, transports)
speaks these types; this module imports none of them at run time.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, TypedDict, get_type_hints

import numpy as np

if TYPE_CHECKING:  # the generator's parameters; amg builds on this module, so the name is for types only
    from .amg.params import GeneratorParams
    from .outputs import RenderedOutputs


class Timings(TypedDict):
    """Seconds per stage of one job: the names metrics (`sam2serve_stage_duration_seconds{stage}`) and
    responses (`StageTimings`) use."""

    image: float  # fetch / parse / decode the input image
    encoder: float
    decoder: float
    postprocess: float  # filters, NMS
    output: float  # full-resolution masks, RLEs, encoded pictures


STAGES: tuple[str, ...] = tuple(get_type_hints(Timings))


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
    tenant: str = ""  # whose API key submitted it: only that tenant sees the job (`tenants`)

    def without_image(self) -> SegmentRequest:
        """The request as kept once its job has ended: the encoded image is no longer needed."""
        from dataclasses import replace

        return replace(self, image_value=b"" if isinstance(self.image_value, bytes) else "")


@dataclass
class MaskRecord:
    rle: dict[str, Any]  # COCO RLE of the full-image mask: {"size": [H, W], "counts": str}
    area: int
    bbox: list[float]  # XYWH
    predicted_iou: float
    stability_score: float
    point_coords: list[list[float]]
    crop_box: list[int]  # XYWH

    def mask(self) -> np.ndarray:
        from .amg.rle import decode_rle  # amg imports this module: resolved at call time

        return decode_rle(self.rle)


@dataclass
class GenerationResult:
    records: list[MaskRecord]
    image_size: tuple[int, int]
    timings: dict[str, float] = field(default_factory=dict)  # encoder, decoder, postprocess, encoding
    counts: dict[str, int] = field(default_factory=dict)  # candidates left after each filter


@dataclass
class SegmentOutcome:
    result: GenerationResult
    rendered: RenderedOutputs
    image_hw: tuple[int, int]
    timings: Timings

    def stored_bytes(self) -> int:
        """About what keeping this outcome costs: its pictures and RLEs."""
        r = self.rendered
        images = [r.combined, *r.individual, *([r.overlay] if r.overlay else [])]
        return sum(len(i.data) for i in images) + sum(len(str(m.rle)) for m in self.result.records)


class Cancelled(Exception):
    """Raised by work that saw `JobControl.should_stop()` return True (at a decoder batch boundary)."""


class JobControl(Protocol):
    """How running work is steered and reports back; called from the thread that runs it."""

    def should_stop(self) -> bool:
        """True once the work should end (cancelled, taken over, server closing): raise `Cancelled`."""
        ...

    def progress(self, done: int, total: int) -> None: ...

    def log(self, message: str) -> None: ...


class Unsupervised:
    """A `JobControl` for work nobody steers or watches (CLI tools, tests, benchmarks)."""

    def should_stop(self) -> bool:
        return False

    def progress(self, done: int, total: int) -> None:
        pass

    def log(self, message: str) -> None:
        pass


UNSUPERVISED = Unsupervised()
