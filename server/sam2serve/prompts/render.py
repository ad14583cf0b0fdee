"""Low-res logits of one prompt set → full-resolution masks, their boxes, pictures and RLEs.

The full-resolution mask is SAM2ImagePredictor's: the *unclamped* logits upsampled bilinearly to the
image size (`postprocess_masks`, no hole filling at its defaults) and thresholded at the mask threshold.
"""

from __future__ import annotations

import functools
import time

import cv2
import numpy as np

from ..amg.masks import upsample_logits
from ..amg.rle import encode_rle
from ..outputs import encode_image
from .model import MaskOutputs, PredictedMask


def render_masks(low_res: np.ndarray, scores: np.ndarray, image_hw: tuple[int, int], threshold: float,
                 outputs: MaskOutputs, logits_ids: list[str], name: str,
                 timings: dict[str, float]) -> list[PredictedMask]:
    """`low_res` [M, 256, 256] and `scores` [M] of one prompt set; pictures are named `{name}_{k}`.
    Adds to `timings["postprocess"]` (upsampling, areas, boxes) and `timings["output"]` (pictures, RLE)."""
    masks = []
    for k in range(len(scores)):
        start = time.perf_counter()
        mask = full_res_mask(low_res[k], image_hw, threshold)
        as_u8 = mask.view(np.uint8)
        area = cv2.countNonZero(as_u8)
        x, y, w, h = cv2.boundingRect(as_u8)
        # Meta's AMG convention, as MaskMetadata.bbox: width and height are max - min of the mask's pixels.
        bbox = [x, y, w - 1, h - 1] if area else []
        middle = time.perf_counter()
        picture = encode_image(mask, outputs.fmt, f"{name}_{k}") if outputs.images else None
        rle = encode_rle(mask) if outputs.rle else None
        timings["postprocess"] = timings.get("postprocess", 0.0) + middle - start
        timings["output"] = timings.get("output", 0.0) + time.perf_counter() - middle
        masks.append(PredictedMask(index=k, score=float(scores[k]),
                                   full_res=functools.partial(full_res_mask, low_res[k], image_hw, threshold),
                                   area=int(area), bbox=bbox, logits_id=logits_ids[k], image=picture, rle=rle))
        del mask, as_u8  # the next mask may take its place: one full-resolution mask alive at a time
    return masks


def full_res_mask(low_res: np.ndarray, image_hw: tuple[int, int], threshold: float) -> np.ndarray:
    """SAM2ImagePredictor's full-resolution mask of one mask's [256, 256] logits."""
    return upsample_logits(low_res, image_hw) > threshold
