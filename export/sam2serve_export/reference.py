"""Meta's SAM2AutomaticMaskGenerator, run as the reference for parity and benchmarks."""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from sam2serve.amg.params import GeneratorParams

log = logging.getLogger(__name__)


def reference_kwargs(p: GeneratorParams) -> dict[str, Any]:
    return {
        "points_per_side": p.points_per_side,
        "point_grids": list(p.point_grids) if p.point_grids is not None else None,
        "points_per_batch": p.points_per_batch,
        "pred_iou_thresh": p.pred_iou_thresh,
        "stability_score_thresh": p.stability_score_thresh,
        "stability_score_offset": p.stability_score_offset,
        "mask_threshold": p.mask_threshold,
        "box_nms_thresh": p.box_nms_thresh,
        "crop_n_layers": p.crop_n_layers,
        "crop_nms_thresh": p.crop_nms_thresh,
        "crop_overlap_ratio": p.crop_overlap_ratio,
        "crop_n_points_downscale_factor": p.crop_n_points_downscale_factor,
        "min_mask_region_area": p.min_mask_region_area,
        "use_m2m": p.use_m2m,
        "multimask_output": p.multimask_output,
        "output_mode": "coco_rle",
    }


EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


def labelled_areas(binary: np.ndarray) -> np.ndarray:
    """Area of the 8-connected component each nonzero pixel of a 2-D map belongs to (0 elsewhere), by
    scipy.ndimage.label: an implementation independent of ours (OpenCV), so that Meta's side of the parity
    harness never runs the code it is compared with."""
    from scipy import ndimage

    labels, _ = ndimage.label(binary, structure=EIGHT_CONNECTED)
    sizes = np.bincount(labels.ravel()).astype(np.int32)
    sizes[0] = 0
    return sizes[labels]


def cpu_connected_components(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Stand-in for SAM 2's CUDA kernel on CPU: per-pixel 8-connected component areas (matched against
    the kernel's recorded output in tests/fixtures/sam2_connected_components.npz)."""
    binary = mask[:, 0].to(torch.uint8).cpu().numpy()
    areas = np.stack([labelled_areas(m) for m in binary])[:, None]
    return torch.from_numpy((binary[:, None] > 0).astype(np.int32)), torch.from_numpy(areas)


@contextlib.contextmanager
def cpu_small_region_kernel() -> Iterator[None]:
    """Let Meta's predictor apply min_mask_region_area on CPU, where its CUDA extension is absent and the
    step would otherwise be skipped with a warning."""
    import sam2.utils.misc as misc

    original = misc.get_connected_components
    misc.get_connected_components = cpu_connected_components
    try:
        yield
    finally:
        misc.get_connected_components = original


def run_reference(model: torch.nn.Module, image: np.ndarray, params: GeneratorParams) -> list[dict[str, Any]]:
    from sam2.automatic_mask_generator import SAM2AutomaticMaskGenerator

    generator = SAM2AutomaticMaskGenerator(model, **reference_kwargs(params))
    with torch.inference_mode(), cpu_small_region_kernel(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return generator.generate(image)
        except IndexError:
            # Meta's cross-crop NMS indexes an empty 1-D tensor when no crop kept any mask
            # (box_area on torch.tensor([])); that case is an empty result.
            if params.crop_n_layers == 0:
                raise
            log.warning("Meta's generator crashed on an empty multi-crop result (a known bug); counted as 0 masks")
            return []
