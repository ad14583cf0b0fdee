"""Checks on prompts, with messages that name the offending prompt. SAM2ImagePredictor checks nothing; a
service must: a NaN or a point far outside the image still yields a confident-looking mask."""

from __future__ import annotations

import math

from ..errors import InvalidInput
from .model import BACKGROUND, FOREGROUND, PromptLimits, PromptRequest


def check_prompts(request: PromptRequest, limits: PromptLimits) -> None:
    """Everything that does not need the image: counts, numbers, labels, box orientation."""
    points, boxes = request.points, request.boxes
    pts, bxs = request.fields.points, request.fields.boxes
    if not points and not boxes:
        raise InvalidInput(f"no prompt: give at least one point ({pts}) or one box ({bxs})", field=pts)
    if len(points) > limits.max_points:
        raise InvalidInput(f"{len(points)} points, over this server's limit of {limits.max_points}", field=pts)
    if len(boxes) > limits.max_boxes:
        raise InvalidInput(f"{len(boxes)} boxes, over this server's limit of {limits.max_boxes}", field=bxs)
    for i, p in enumerate(points):
        if not (math.isfinite(p.x) and math.isfinite(p.y)):
            raise InvalidInput(f"{pts}[{i}] = ({p.x}, {p.y}): coordinates must be finite numbers", field=pts)
        if p.label not in (FOREGROUND, BACKGROUND):
            raise InvalidInput(f"{pts}[{i}].label must be 1 (foreground) or 0 (background), got {p.label}",
                               field=pts)
    for i, b in enumerate(boxes):
        corners = (b.x_min, b.y_min, b.x_max, b.y_max)
        if not all(math.isfinite(v) for v in corners):
            raise InvalidInput(f"{bxs}[{i}] = {_fmt(corners)}: coordinates must be finite numbers", field=bxs)
        if not (b.x_min < b.x_max and b.y_min < b.y_max):
            raise InvalidInput(f"{bxs}[{i}] = {_fmt(corners)} is inverted or empty: "
                               "x_min < x_max and y_min < y_max are needed", field=bxs)


def check_within_image(request: PromptRequest, width: int, height: int) -> None:
    """Every point and box corner on the image: 0 <= x <= width, 0 <= y <= height (pixel edges)."""
    def inside(x: float, y: float) -> bool:
        return 0.0 <= x <= width and 0.0 <= y <= height

    pts, bxs = request.fields.points, request.fields.boxes
    for i, p in enumerate(request.points):
        if not inside(p.x, p.y):
            raise InvalidInput(f"{pts}[{i}] = ({p.x:g}, {p.y:g}) lies outside the {width}x{height} image "
                               f"(x within 0..{width}, y within 0..{height})", field=pts)
    for i, b in enumerate(request.boxes):
        if not (inside(b.x_min, b.y_min) and inside(b.x_max, b.y_max)):
            raise InvalidInput(f"{bxs}[{i}] = {_fmt((b.x_min, b.y_min, b.x_max, b.y_max))} reaches outside the "
                               f"{width}x{height} image (x within 0..{width}, y within 0..{height})", field=bxs)


def _fmt(values: tuple[float, ...]) -> str:
    return "(" + ", ".join(f"{v:g}" for v in values) + ")"
