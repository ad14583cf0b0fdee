"""Request fields → a validated SegmentRequest, for every protocol.

gRPC's protobuf and fal's JSON both arrive here as {field name: value}; this is the one place their values
are checked (type, range, the server's limits), with messages that name the field.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from .amg.params import GeneratorParams, fal_defaults
from .domain import OutputOptions, SegmentRequest
from .errors import InvalidInput

if TYPE_CHECKING:
    from .config import ServerConfig


@dataclass(frozen=True)
class RequestLimits:
    max_points_per_side: int = 64
    max_crop_n_layers: int = 3
    max_points_per_batch: int = 1024

    @classmethod
    def of(cls, config: ServerConfig) -> RequestLimits:
        return cls(max_points_per_side=config.max_points_per_side, max_crop_n_layers=config.max_crop_n_layers)


# generator field: (type, minimum, maximum); a maximum of 0 is taken from RequestLimits
GENERATOR_FIELDS: dict[str, tuple[type, float, float]] = {
    "points_per_side": (int, 1, 0),
    "pred_iou_thresh": (float, 0.0, 1.0),
    "stability_score_thresh": (float, 0.0, 1.0),
    "min_mask_region_area": (int, 0, 256 * 256),
    "points_per_batch": (int, 1, 0),
    "box_nms_thresh": (float, 0.0, 1.0),
    "crop_n_layers": (int, 0, 0),
    "crop_nms_thresh": (float, 0.0, 1.0),
    "crop_overlap_ratio": (float, 0.0, 0.99),
    "crop_n_points_downscale_factor": (int, 1, 16),
    "stability_score_offset": (float, 0.0, 32.0),
    "mask_threshold": (float, -32.0, 32.0),
    "output_min_region_area": (int, 0, 100_000_000),
}
GENERATOR_BOOLS = ("use_m2m", "multimask_output")
OUTPUT_FIELDS = ("max_masks",)
FIELDS = (*GENERATOR_FIELDS, *GENERATOR_BOOLS, *OUTPUT_FIELDS)  # what `segment_request` takes in `fields`


def segment_request(image_kind: str, image_value: str | bytes, fields: Mapping[str, object], limits: RequestLimits,
                    *, fmt: str = "png", individual_masks: bool = True, rle: bool = False, overlay: bool = False,
                    webhook_url: str = "", delivery: Mapping[str, str] | None = None,
                    defaults: GeneratorParams | None = None) -> SegmentRequest:
    """The request; `fields` holds the fields the caller set (of FIELDS), absent ones take fal's defaults.

    The image is checked by the job (sam2serve.inputs), which reads it."""
    unknown = set(fields) - set(FIELDS)
    if unknown:
        raise InvalidInput(f"unknown field(s): {', '.join(sorted(unknown))}", field=sorted(unknown)[0])
    maxima = {"points_per_side": limits.max_points_per_side, "crop_n_layers": limits.max_crop_n_layers,
              "points_per_batch": limits.max_points_per_batch}
    overrides: dict[str, Any] = {}
    for name, (kind, low, high) in GENERATOR_FIELDS.items():
        if name in fields:
            overrides[name] = _in_range(name, _number(name, fields[name], kind), low, maxima.get(name, high))
    for name in GENERATOR_BOOLS:
        if name in fields:
            overrides[name] = _boolean(name, fields[name])
    max_masks = None
    if "max_masks" in fields:
        max_masks = int(_number("max_masks", fields["max_masks"], int))
        if max_masks < 0:
            raise InvalidInput(f"max_masks must be 0 or more, got {max_masks}", field="max_masks")
    if webhook_url and not webhook_url.startswith(("http://", "https://")):
        raise InvalidInput(f"webhook_url must be an http or https URL, got {webhook_url[:60]!r}", field="webhook_url")
    params = replace(defaults or fal_defaults(), **overrides)
    output = OutputOptions(fmt=fmt, individual_masks=individual_masks, rle=rle, overlay=overlay, max_masks=max_masks)
    return SegmentRequest(image_kind, image_value, params, output, webhook_url, dict(delivery or {}))


def _number(name: str, value: object, kind: type) -> int | float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidInput(f"{name} must be {'an integer' if kind is int else 'a number'}, got {value!r}", field=name)
    if not math.isfinite(value):
        raise InvalidInput(f"{name} must be a finite number, got {value}", field=name)
    if kind is int:
        if not float(value).is_integer():
            raise InvalidInput(f"{name} must be an integer, got {value:g}", field=name)
        return int(value)
    return float(value)


def _in_range(name: str, value: int | float, low: float, high: float) -> int | float:
    if not low <= value <= high:
        raise InvalidInput(f"{name} must be between {low:g} and {high:g}, got {value:g}", field=name)
    return value


def _boolean(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise InvalidInput(f"{name} must be true or false, got {value!r}", field=name)
    return value
