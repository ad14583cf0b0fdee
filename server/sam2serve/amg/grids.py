"""Point grids and crop boxes, as sam2.utils.amg builds them."""

from __future__ import annotations

import math
from itertools import product

import numpy as np

from .params import GeneratorParams


def build_point_grid(n_per_side: int) -> np.ndarray:
    """Cell centres of an n×n grid over [0, 1]², x varying fastest: [n*n, 2] float64."""
    if n_per_side < 1:
        raise ValueError(f"a point grid needs at least 1 point per side, got {n_per_side}")
    offset = 1 / (2 * n_per_side)
    side = np.linspace(offset, 1 - offset, n_per_side)
    xs = np.tile(side[None, :], (n_per_side, 1))
    ys = np.tile(side[:, None], (1, n_per_side))
    return np.stack([xs, ys], axis=-1).reshape(-1, 2)


def layer_points_per_side(n_per_side: int, n_layers: int, scale_per_layer: int) -> list[int]:
    """Points per side of each crop layer's grid, as Meta computes them: int(n / scale**layer)."""
    return [int(n_per_side / (scale_per_layer**i)) for i in range(n_layers + 1)]


def build_all_layer_point_grids(n_per_side: int, n_layers: int, scale_per_layer: int) -> list[np.ndarray]:
    return [build_point_grid(n) for n in layer_points_per_side(n_per_side, n_layers, scale_per_layer)]


def crops_in_layer(layer: int) -> int:
    """Crop boxes of a layer: the whole image for layer 0, then (2**layer)² overlapping crops."""
    return 4**layer


def decoder_prompts(params: GeneratorParams) -> int:
    """Prompts the decoder runs for one image: each layer's grid times its crops, and with use_m2m one more
    run per candidate mask (3 per prompt with multimask_output, else 1). The work a request asks for."""
    if params.point_grids is not None:
        per_layer = [len(grid) for grid in params.point_grids]
    else:
        assert params.points_per_side is not None
        per_layer = [n * n for n in layer_points_per_side(params.points_per_side, params.crop_n_layers,
                                                           params.crop_n_points_downscale_factor)]
    prompts = sum(per_layer[layer] * crops_in_layer(layer) for layer in range(params.crop_n_layers + 1))
    return prompts * (1 + (3 if params.multimask_output else 1)) if params.use_m2m else prompts


def generate_crop_boxes(im_size: tuple[int, int], n_layers: int,
                        overlap_ratio: float) -> tuple[list[list[int]], list[int]]:
    """XYXY crop boxes: the whole image, then (2**i)² overlapping crops for layer i = 1..n_layers."""
    im_h, im_w = im_size
    short_side = min(im_h, im_w)
    boxes, layers = [[0, 0, im_w, im_h]], [0]

    def crop_len(orig_len: int, n_crops: int, overlap: int) -> int:
        return math.ceil((overlap * (n_crops - 1) + orig_len) / n_crops)

    for i_layer in range(n_layers):
        n_per_side = 2 ** (i_layer + 1)
        overlap = int(overlap_ratio * short_side * (2 / n_per_side))
        crop_w, crop_h = crop_len(im_w, n_per_side, overlap), crop_len(im_h, n_per_side, overlap)
        x0s = [int((crop_w - overlap) * i) for i in range(n_per_side)]
        y0s = [int((crop_h - overlap) * i) for i in range(n_per_side)]
        for x0, y0 in product(x0s, y0s):
            boxes.append([x0, y0, min(x0 + crop_w, im_w), min(y0 + crop_h, im_h)])
            layers.append(i_layer + 1)
    return boxes, layers
