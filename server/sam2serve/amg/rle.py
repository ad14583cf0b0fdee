"""COCO run-length encoding of full-image masks (pycocotools), as Meta's `coco_rle` output mode."""

from __future__ import annotations

import cv2
import numpy as np
from pycocotools import mask as mask_utils


def encode_rle(mask: np.ndarray) -> dict[str, object]:
    """Binary HxW mask → {"size": [H, W], "counts": str} (compressed COCO RLE)."""
    as_bytes = mask.view(np.uint8) if mask.dtype == np.bool_ else mask.astype(np.uint8)
    # pycocotools reads column-major bytes; OpenCV's blocked transpose makes them several times faster than
    # numpy's strided copy (np.asfortranarray) of a large mask.
    rle = mask_utils.encode(cv2.transpose(np.ascontiguousarray(as_bytes)).T)
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


def decode_rle(rle: dict[str, object]) -> np.ndarray:
    counts = rle["counts"]
    coco = {"size": rle["size"], "counts": counts.encode("ascii") if isinstance(counts, str) else counts}
    return mask_utils.decode(coco).astype(bool)


def rle_area(rle: dict[str, object]) -> int:
    counts = rle["counts"]
    coco = {"size": rle["size"], "counts": counts.encode("ascii") if isinstance(counts, str) else counts}
    return int(mask_utils.area(coco))
