"""The generator's parameters, with the defaults of Meta's SAM2AutomaticMaskGenerator."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class GeneratorParams:
    points_per_side: int | None = 32
    point_grids: tuple[np.ndarray, ...] | None = None  # one [N, 2] grid in [0, 1] per crop layer
    points_per_batch: int = 64  # prompts per decoder call (Meta's); memory caps it further
    pred_iou_thresh: float = 0.8
    stability_score_thresh: float = 0.95
    stability_score_offset: float = 1.0
    mask_threshold: float = 0.0
    box_nms_thresh: float = 0.7
    crop_n_layers: int = 0
    crop_nms_thresh: float = 0.7
    crop_overlap_ratio: float = 512 / 1500
    crop_n_points_downscale_factor: int = 1
    # SAM 2 semantics: fill background components / drop foreground components of at most this many
    # pixels in the 256×256 low-res logits (8-connectivity) before upsampling. 0 disables.
    min_mask_region_area: int = 0
    # SAM 1 semantics instead: the same cleanup on each full-resolution output mask, then a box NMS that
    # prefers unchanged masks (Meta's postprocess_small_regions). 0 disables.
    output_min_region_area: int = 0
    use_m2m: bool = False
    multimask_output: bool = True

    def __post_init__(self) -> None:
        if (self.points_per_side is None) == (self.point_grids is None):
            raise ValueError("exactly one of points_per_side and point_grids must be given")


def fal_defaults() -> GeneratorParams:
    """The defaults of fal-ai/sam2/auto-segment (32 points per side, 0.88 / 0.95 / 100)."""
    return GeneratorParams(pred_iou_thresh=0.88, stability_score_thresh=0.95, min_mask_region_area=100)
