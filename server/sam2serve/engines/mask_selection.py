"""SAM 2's choice among the decoder's mask tokens (MaskDecoder.forward), in numpy.

The exported decoder returns all tokens so one graph serves multimask and single-mask prediction.
"""

from __future__ import annotations

import numpy as np

from .manifest import Manifest

LOW_RES_CLAMP = 32.0  # SAM2ImagePredictor clamps the low-res logits it returns, which callers feed back as mask input


def select_multimask(masks: np.ndarray, iou: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return masks[:, 1:], iou[:, 1:]


def single_mask_stability(logits: np.ndarray, delta: float) -> np.ndarray:
    """MaskDecoder._get_stability_scores for [B, 1, H, W] logits → [B, 1]."""
    flat = logits.reshape(logits.shape[0], logits.shape[1], -1)
    area_i = np.count_nonzero(flat > delta, axis=-1).astype(np.float32)
    area_u = np.count_nonzero(flat > -delta, axis=-1).astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(area_u > 0, area_i / area_u, np.float32(1.0))


def select_single_mask(
    masks: np.ndarray, iou: np.ndarray, dynamic: bool, delta: float, thresh: float
) -> tuple[np.ndarray, np.ndarray]:
    """Token 0, or — when `dynamic` and its stability is below `thresh` — the best multimask token."""
    single, single_iou = masks[:, 0:1], iou[:, 0:1]
    if not dynamic:
        return single, single_iou
    rows = np.arange(masks.shape[0])
    best = np.argmax(iou[:, 1:], axis=-1) + 1
    best_masks, best_iou = masks[rows, best][:, None], iou[rows, best][:, None]
    stable = single_mask_stability(single, delta) >= thresh  # [B, 1]
    return (
        np.where(stable[:, :, None, None], single, best_masks),
        np.where(stable, single_iou, best_iou),
    )


def select_tokens(masks: np.ndarray, iou: np.ndarray, multimask: bool,
                  manifest: Manifest) -> tuple[np.ndarray, np.ndarray]:
    """What `MaskDecoder.forward` returns, from the logits and IoU of all tokens."""
    if multimask:
        return select_multimask(masks, iou)
    return select_single_mask(masks, iou, manifest.dynamic_multimask_via_stability,
                              manifest.dynamic_multimask_stability_delta,
                              manifest.dynamic_multimask_stability_thresh)
