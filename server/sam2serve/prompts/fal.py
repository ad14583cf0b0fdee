"""fal's prompted endpoint, `fal-ai/sam2/image`, on the prompt data plane: its JSON input → `PromptRequest`,
and the outcome → its one output picture. Transport-free, for the HTTP adapter to route to.

Input (fal's schema): `image_url` (http(s) or data URI), `prompts` [{x, y, label}], `box_prompts`
[{x_min, y_min, x_max, y_max}], `apply_mask`, `sync_mode`, `output_format` (png, jpeg, webp).
Output: `{"image": File}` — the mask as a black-and-white picture, or with `apply_mask` the photo with the
mask applied (transparent outside it in PNG and WebP, black in JPEG). All prompts go into one prediction
(SAM 2's single mask, as one picture); several boxes give one mask each, and the picture is their union.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import InvalidInput
from ..outputs import EncodedImage, encode_image
from .model import BoxPrompt, ImageSource, MaskOutputs, PointPrompt, PromptOutcome, PromptRequest

FAL_FORMATS = ("png", "jpeg", "webp")


@dataclass(frozen=True)
class FalImageOptions:
    apply_mask: bool = False
    sync_mode: bool = False  # the adapter returns a data URI instead of a file URL
    output_format: str = "png"


def from_fal_input(payload: dict[str, Any]) -> tuple[PromptRequest, FalImageOptions]:
    """Check fal's input and translate it; InvalidInput messages name the field (the adapter's 422)."""
    if not isinstance(payload, dict):
        raise InvalidInput("the input must be a JSON object")
    url = payload.get("image_url")
    if not isinstance(url, str) or not url:
        raise InvalidInput("image_url is required: an http(s) URL or a data URI")
    source = ImageSource("data_uri" if url.startswith("data:") else "url", url)
    points = tuple(_point(i, p) for i, p in enumerate(_list(payload, "prompts")))
    boxes = tuple(_box(i, b) for i, b in enumerate(_list(payload, "box_prompts")))
    fmt = payload.get("output_format", "png")
    if fmt not in FAL_FORMATS:
        raise InvalidInput(f"output_format must be one of {', '.join(FAL_FORMATS)}, got {fmt!r}")
    options = FalImageOptions(_bool(payload, "apply_mask"), _bool(payload, "sync_mode"), fmt)
    return PromptRequest(source, points, boxes, multimask=False, outputs=MaskOutputs(fmt=fmt, images=False)), options


def fal_image(outcome: PromptOutcome, options: FalImageOptions) -> EncodedImage:
    """fal's `image`: the union of every prompt set's best mask, or the photo with it applied."""
    mask = np.zeros((outcome.image.height, outcome.image.width), bool)
    for result in outcome.results:
        mask |= result.masks[result.best_index].mask
    if not options.apply_mask:
        return encode_image(mask, options.output_format, "mask")
    rgb = outcome.image.rgb
    if rgb is None:
        raise ValueError("apply_mask needs the decoded image in the outcome (a call that carried the image)")
    if options.output_format == "jpeg":  # no alpha channel: black outside the mask
        return encode_image(np.where(mask[..., None], rgb, np.uint8(0)), "jpeg", "masked")
    return encode_image(np.dstack([rgb, mask.view(np.uint8) * np.uint8(255)]), options.output_format, "masked")


def _list(payload: dict[str, Any], name: str) -> list[Any]:
    value = payload.get(name) or []
    if not isinstance(value, list):
        raise InvalidInput(f"{name} must be a list")
    return value


def _bool(payload: dict[str, Any], name: str) -> bool:
    value = payload.get(name, False)
    if not isinstance(value, bool):
        raise InvalidInput(f"{name} must be true or false, got {value!r}")
    return value


def _number(item: dict[str, Any], key: str, where: str) -> float:
    value = item.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidInput(f"{where}.{key} must be a number, got {value!r}")
    return float(value)


def _point(i: int, item: Any) -> PointPrompt:
    where = f"prompts[{i}]"
    if not isinstance(item, dict):
        raise InvalidInput(f"{where} must be an object {{x, y, label}}")
    label = item.get("label", 1)
    if label not in (0, 1) or isinstance(label, bool):
        raise InvalidInput(f"{where}.label must be 1 (foreground) or 0 (background), got {label!r}")
    return PointPrompt(_number(item, "x", where), _number(item, "y", where), int(label))


def _box(i: int, item: Any) -> BoxPrompt:
    where = f"box_prompts[{i}]"
    if not isinstance(item, dict):
        raise InvalidInput(f"{where} must be an object {{x_min, y_min, x_max, y_max}}")
    return BoxPrompt(*(_number(item, key, where) for key in ("x_min", "y_min", "x_max", "y_max")))
