"""fal's JSON for `fal-ai/sam2/image` ↔ the prompt data plane (sam2serve.prompts), as fal publishes the app's
schema (SAM2ImageInput, SAM2ImageOutput).

Input: `image_url` (http(s) URL or data URI), `prompts` [{x, y, label}] (label 1 foreground, the default, or 0
background), `box_prompts` [{x_min, y_min, x_max, y_max}], `apply_mask`, `sync_mode`, `output_format` (png,
jpeg, webp); null means the default. fal's prompt types are shared with sam2/video: their `frame_index` is
accepted and ignored (an image has one frame). Anything else is refused.
Output: `{"image": File}`. All prompts go into one prediction with SAM 2's single mask (multimask off, as
the picture holds one mask); several boxes give one mask each (every box with all the points), and the
picture is their union: the mask in black and white, or with `apply_mask` the photo with the mask applied
(transparent outside it in PNG and WebP, black in JPEG, which has no alpha channel).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ...errors import InvalidInput
from ...outputs import EncodedImage, encode_image
from ...prompts import BoxPrompt, ImageSource, MaskOutputs, PointPrompt, PromptFields, PromptOutcome, PromptRequest
from ...prompts.model import FOREGROUND

IMAGE_APP = "fal-ai/sam2/image"
FIELDS = ("image_url", "prompts", "box_prompts", "apply_mask", "sync_mode", "output_format")
OUTPUT_FORMATS = ("png", "jpeg", "webp")
NAMES = PromptFields(points="prompts", boxes="box_prompts")  # what fal calls them, in every error message
_POINT_KEYS = ("x", "y", "label", "frame_index")
_BOX_KEYS = ("x_min", "y_min", "x_max", "y_max", "frame_index")


@dataclass(frozen=True)
class ImageOptions:
    apply_mask: bool = False
    sync_mode: bool = False  # a data URI in the output instead of a URL of this server
    output_format: str = "png"


def to_prompt_request(body: object, image: tuple[str, str | bytes] | None = None
                      ) -> tuple[PromptRequest, ImageOptions]:
    """The prompt request of fal's input, and how to render its output; `image` replaces image_url's own
    (kind, value) when the URL was resolved here (an upload to this server). InvalidInput names the field."""
    if not isinstance(body, dict):
        raise InvalidInput(f"the request body must be a JSON object of {IMAGE_APP}'s input, got "
                           f"{type(body).__name__}")
    unknown = sorted(k for k in body if k not in FIELDS)
    if unknown:
        raise InvalidInput(f"unknown field {unknown[0]!r}: {IMAGE_APP} takes {', '.join(FIELDS)}", field=unknown[0])
    url = body.get("image_url")
    if not isinstance(url, str) or not url:
        raise InvalidInput("image_url is required: an http(s) URL or a data URI of the image", field="image_url")
    kind, value = image or (("data_uri", url) if url.startswith("data:") else ("url", url))
    points = tuple(_point(i, p) for i, p in enumerate(_list(body, "prompts")))
    boxes = tuple(_box(i, b) for i, b in enumerate(_list(body, "box_prompts")))
    fmt = _or_default(body, "output_format", "png")
    if fmt not in OUTPUT_FORMATS:
        raise InvalidInput(f"output_format must be one of {', '.join(OUTPUT_FORMATS)}, got {fmt!r}",
                           field="output_format")
    options = ImageOptions(_bool(body, "apply_mask"), _bool(body, "sync_mode"), str(fmt))
    request = PromptRequest(ImageSource(kind, value), points, boxes, multimask=False,
                            outputs=MaskOutputs(fmt=str(fmt), images=False), fields=NAMES)
    return request, options


def output_image(outcome: PromptOutcome, options: ImageOptions) -> EncodedImage:
    """fal's `image`: the union of every prompt set's best mask, or the photo with it applied."""
    mask = np.zeros((outcome.image.height, outcome.image.width), bool)
    for result in outcome.results:
        mask |= result.masks[result.best_index].mask()
    if not options.apply_mask:
        return encode_image(mask, options.output_format, "mask")
    rgb = outcome.image.rgb
    if rgb is None:
        raise ValueError("apply_mask needs the decoded image in the outcome (a call that carried the image)")
    if options.output_format == "jpeg":
        return encode_image(np.where(mask[..., None], rgb, np.uint8(0)), "jpeg", "masked")
    return encode_image(np.dstack([rgb, mask.view(np.uint8) * np.uint8(255)]), options.output_format, "masked")


def _or_default(body: dict[str, Any], name: str, default: object) -> object:
    value = body.get(name)
    return default if value is None else value


def _list(body: dict[str, Any], name: str) -> list[Any]:
    value = _or_default(body, name, [])
    if not isinstance(value, list):
        raise InvalidInput(f"{name} must be a list, got {type(value).__name__}", field=name)
    return value


def _bool(body: dict[str, Any], name: str) -> bool:
    value = _or_default(body, name, False)
    if not isinstance(value, bool):
        raise InvalidInput(f"{name} must be true or false, got {value!r}", field=name)
    return value


def _object(item: object, where: str, field: str, keys: tuple[str, ...]) -> dict[str, Any]:
    if not isinstance(item, dict):
        raise InvalidInput(f"{where} must be an object {{{', '.join(keys[:-1])}}}, got {item!r}", field=field)
    unknown = sorted(k for k in item if k not in keys)
    if unknown:
        raise InvalidInput(f"{where} has an unknown key {unknown[0]!r}: it takes {', '.join(keys)}", field=field)
    frame = item.get("frame_index")
    if frame is not None and (isinstance(frame, bool) or not isinstance(frame, int)):
        raise InvalidInput(f"{where}.frame_index must be an integer, got {frame!r}", field=field)
    return item


def _number(item: dict[str, Any], key: str, where: str, field: str) -> float:
    value = item.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidInput(f"{where}.{key} must be a number, got {value!r}", field=field)
    return float(value)  # finiteness and the image's bounds: checked with every protocol's prompts


def _point(i: int, item: object) -> PointPrompt:
    where = f"prompts[{i}]"
    point = _object(item, where, "prompts", _POINT_KEYS)
    label = _or_default(point, "label", FOREGROUND)
    if isinstance(label, bool) or label not in (0, 1):
        raise InvalidInput(f"{where}.label must be 1 (foreground) or 0 (background), got {label!r}", field="prompts")
    return PointPrompt(_number(point, "x", where, "prompts"), _number(point, "y", where, "prompts"), int(label))


def _box(i: int, item: object) -> BoxPrompt:
    where = f"box_prompts[{i}]"
    box = _object(item, where, "box_prompts", _BOX_KEYS)
    return BoxPrompt(*(_number(box, key, where, "box_prompts") for key in ("x_min", "y_min", "x_max", "y_max")))
