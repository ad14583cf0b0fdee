"""What a prompted segmentation call asks for and what it gets back, free of any transport."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..outputs import EncodedImage

FOREGROUND, BACKGROUND = 1, 0


@dataclass(frozen=True)
class PointPrompt:
    """A click in pixels of the original image."""

    x: float
    y: float
    label: int = FOREGROUND


@dataclass(frozen=True)
class BoxPrompt:
    """A box in pixels of the original image (XYXY)."""

    x_min: float
    y_min: float
    x_max: float
    y_max: float


@dataclass(frozen=True)
class ImageSource:
    """Where the image comes from: `kind` "url", "data_uri" or "bytes" (as `inputs.load_image`), or
    "image_id" for an embedding an earlier call left in this replica's cache."""

    kind: str
    value: str | bytes
    fetched: bytes | None = field(default=None, repr=False, compare=False)  # an image_url's body, downloaded


@dataclass(frozen=True)
class MaskOutputs:
    fmt: str = "png"  # png, jpeg or webp
    images: bool = True  # one binary picture per mask
    rle: bool = False  # COCO RLE per mask


@dataclass(frozen=True)
class PromptFields:
    """What the caller's protocol names the point and box lists (gRPC's `points`/`boxes`, fal's
    `prompts`/`box_prompts`): error messages and the field of InvalidInput (fal's 422 `loc`) use them."""

    points: str = "points"
    boxes: str = "boxes"


@dataclass(frozen=True)
class PromptRequest:
    image: ImageSource
    points: tuple[PointPrompt, ...] = ()
    boxes: tuple[BoxPrompt, ...] = ()
    mask_input_id: str = ""  # `PredictedMask.logits_id` of an earlier call on the same image
    multimask: bool = True  # SAM2ImagePredictor.predict's default
    outputs: MaskOutputs = MaskOutputs()
    fields: PromptFields = PromptFields()


@dataclass(frozen=True)
class PromptLimits:
    max_points: int = 64
    max_boxes: int = 16


@dataclass
class PredictedMask:
    index: int  # token order, as SAM2ImagePredictor.predict returns the masks
    score: float  # predicted IoU
    full_res: Callable[[], np.ndarray]  # makes the HxW bool mask (logits > threshold) again; not kept
    area: int
    bbox: list[int]  # XYWH; empty for an empty mask
    logits_id: str  # mask_input_id that refines this mask
    image: EncodedImage | None = None
    rle: dict[str, Any] | None = None  # {"size": [H, W], "counts": str}

    def mask(self) -> np.ndarray:
        """The full-resolution mask, made from its low-res logits on each call (48 kept at 40 MP were 1.9 GB)."""
        return self.full_res()


@dataclass
class PromptSetResult:
    masks: list[PredictedMask]

    @property
    def best_index(self) -> int:
        return int(np.argmax([m.score for m in self.masks])) if self.masks else 0


@dataclass
class EmbeddedImage:
    image_id: str
    width: int
    height: int
    cached: bool  # found in the cache rather than encoded by this call
    rgb: np.ndarray | None = None  # the decoded image when the call carried one (not kept in the cache)
    timings: dict[str, float] = field(default_factory=dict)  # image, encoder


@dataclass
class PromptOutcome:
    image: EmbeddedImage
    results: list[PromptSetResult]  # one per box, or one for points without a box
    timings: dict[str, float] = field(default_factory=dict)  # image, encoder, decoder, postprocess, output
