"""Pictures of a generation result: the combined colour mask, an overlay on the photo, single masks.

Everything works from the records' COCO RLEs, decoding one full-resolution mask at a time: what is held is
one label map (uint16 per pixel; int32 beyond 65 534 masks), the output picture and, for the overlay, the
masks' contour points, never all the masks at once.

Colours: the mask at position *i* of `records` (the response order) has `colour_for(i)`, in the combined
mask and the overlay alike, so the i-th individual mask and its colour agree. Masks are painted largest
first (by `MaskRecord.area`; among equal areas the later one in response order first) so that smaller
masks stay visible on top of the larger ones they overlap.
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np

from ..domain import MaskRecord
from .palette import colour_for, palette_lut

DEFAULT_ALPHA = 0.5
DEFAULT_CONTOUR_THICKNESS = 2


def combined_mask(records: Sequence[MaskRecord], image_hw: tuple[int, int]) -> np.ndarray:
    """HxWx3 uint8 RGB: every mask in its palette colour, smaller masks on top, background black."""
    labels, _ = _paint_labels(records, image_hw, with_contours=False)
    return palette_lut(len(records))[labels]


def overlay(image_rgb: np.ndarray, records: Sequence[MaskRecord], alpha: float = DEFAULT_ALPHA,
            contour_thickness: int = DEFAULT_CONTOUR_THICKNESS) -> np.ndarray:
    """The photo with each mask blended in its palette colour (`alpha` of the colour) and outlined.

    Outlines (`contour_thickness` px, 0 for none) are drawn in the mask's full colour, in painting order,
    after all the fills, so the outline of a large mask stays visible across the smaller masks on top of
    it. They are clipped to the union of the masks: every pixel no mask covers is exactly the photo's.
    """
    return combined_and_overlay(image_rgb, records, alpha, contour_thickness)[1]


def combined_and_overlay(image_rgb: np.ndarray, records: Sequence[MaskRecord], alpha: float = DEFAULT_ALPHA,
                         contour_thickness: int = DEFAULT_CONTOUR_THICKNESS) -> tuple[np.ndarray, np.ndarray]:
    """`combined_mask` and `overlay` from one decoding pass over the masks."""
    image = _check_rgb(image_rgb)
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be within [0, 1], got {alpha}")
    if contour_thickness < 0:
        raise ValueError(f"contour_thickness must be >= 0, got {contour_thickness}")
    labels, contours = _paint_labels(records, image.shape[:2], with_contours=contour_thickness > 0)
    colours = palette_lut(len(records))[labels]
    covered = labels > 0
    del labels
    blended = cv2.addWeighted(image, 1.0 - alpha, colours, alpha, 0.0)
    out = np.where(covered[..., None], blended, image)
    del blended
    for index, outline in contours:
        cv2.drawContours(out, outline, -1, colour_for(index), contour_thickness, lineType=cv2.LINE_8)
    uncovered = ~covered
    out[uncovered] = image[uncovered]  # outlines are centred on the mask's edge: clip their outer half
    return colours, out


def individual_mask(record: MaskRecord) -> np.ndarray:
    """HxW uint8 mask of one record: 255 inside, 0 outside (C order)."""
    out = _c_order(record.mask().view(np.uint8))
    out *= 255
    return out


def paint_order(records: Sequence[MaskRecord]) -> list[int]:
    """Indices of `records` in painting order: larger area first, then later in response order first."""
    return sorted(range(len(records)), key=lambda i: (-int(records[i].area), -i))


def _paint_labels(records: Sequence[MaskRecord], image_hw: tuple[int, int], with_contours: bool
                  ) -> tuple[np.ndarray, list[tuple[int, Sequence[np.ndarray]]]]:
    """Label map (0 = background, i + 1 = the mask at position i on top there) and, if asked, each
    mask's contours in painting order. Decodes one mask at a time."""
    height, width = (int(v) for v in image_hw)
    for i, record in enumerate(records):  # cheap, and before any decoding
        size = [int(v) for v in record.rle["size"]]
        if size != [height, width]:
            raise ValueError(f"mask {i} is {size[0]}x{size[1]}, the image is {height}x{width}")
    labels = np.zeros((height, width), np.uint16 if len(records) < 65535 else np.int32)
    contours: list[tuple[int, Sequence[np.ndarray]]] = []
    for i in paint_order(records):
        mask = records[i].mask()
        as_u8 = mask.view(np.uint8)
        cols, rows = np.flatnonzero(mask.any(axis=0)), np.flatnonzero(mask.any(axis=1))
        if len(cols):  # an empty mask paints nothing
            x0, x1, y0, y1 = int(cols[0]), int(cols[-1]) + 1, int(rows[0]), int(rows[-1]) + 1
            labels[y0:y1, x0:x1][mask[y0:y1, x0:x1]] = i + 1
            if with_contours:  # RETR_LIST: holes are outlined too
                found, _ = cv2.findContours(np.ascontiguousarray(as_u8[y0:y1, x0:x1]), cv2.RETR_LIST,
                                            cv2.CHAIN_APPROX_SIMPLE, offset=(x0, y0))
                contours.append((i, found))
        del mask, as_u8  # before the next decode
    return labels, contours


def _c_order(array: np.ndarray) -> np.ndarray:
    """A C-ordered copy. pycocotools decodes to Fortran order, which OpenCV transposes fast."""
    if array.flags.f_contiguous and not array.flags.c_contiguous and array.ndim == 2:
        return cv2.transpose(array.T)
    return np.array(array, order="C", copy=True)


def _check_rgb(image_rgb: np.ndarray) -> np.ndarray:
    image = np.asarray(image_rgb)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an HxWx3 uint8 RGB image, got {image.dtype} {image.shape}")
    return np.ascontiguousarray(image)
