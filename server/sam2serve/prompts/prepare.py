"""Prompts → decoder inputs, as `SAM2ImagePredictor._prep_prompts` and `_predict` build them.

Box corners become two points labelled 2 and 3 in front of the clicks; the prompt encoder still appends
its padding point (label -1), which our decoder graph adds itself, as Meta's predictor passes boxes=None
to `sam_prompt_encoder`. Coordinates go to the model's input frame (`transform_coords`, normalize=True).
"""

from __future__ import annotations

import numpy as np

from ..engines.mask_selection import LOW_RES_CLAMP
from ..preprocess import to_model_coords
from .model import BoxPrompt, PointPrompt

BOX_CORNER_LABELS = (2.0, 3.0)  # top-left, bottom-right


def decoder_prompts(points: tuple[PointPrompt, ...], boxes: tuple[BoxPrompt, ...], image_hw: tuple[int, int],
                    size: int) -> tuple[np.ndarray, np.ndarray]:
    """Coordinates [B, N, 2] in the `size`×`size` model frame and labels [B, N]: one row per box (each box
    with every point), or one row of the points when there is no box."""
    clicks = np.array([[p.x, p.y] for p in points], np.float32).reshape(-1, 2)
    click_labels = np.array([p.label for p in points], np.float32)
    if boxes:
        corners = np.array([[[b.x_min, b.y_min], [b.x_max, b.y_max]] for b in boxes], np.float32)
        rows = len(boxes)
        coords = np.concatenate([corners, np.broadcast_to(clicks, (rows, *clicks.shape))], axis=1)
        labels = np.concatenate([np.broadcast_to(np.array(BOX_CORNER_LABELS, np.float32), (rows, 2)),
                                 np.broadcast_to(click_labels, (rows, len(click_labels)))], axis=1)
    else:
        coords, labels = clicks[None], click_labels[None]
    return to_model_coords(coords, image_hw, size), np.ascontiguousarray(labels)


def mask_input(low_res_logits: np.ndarray, rows: int) -> np.ndarray:
    """An earlier mask's [256, 256] low-res logits → the decoder's mask input [rows, 1, 256, 256]."""
    clamped = np.clip(low_res_logits, -LOW_RES_CLAMP, LOW_RES_CLAMP).astype(np.float32, copy=False)
    return np.ascontiguousarray(np.broadcast_to(clamped, (rows, 1, *clamped.shape)))
