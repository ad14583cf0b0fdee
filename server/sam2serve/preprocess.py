"""Image → model input, matching SAM2Transforms (ToTensor → antialiased bilinear Resize → Normalize).

PIL's BILINEAR resize in float mode 'F' uses the same antialiasing filter as torchvision's Resize on
float tensors (measured max abs difference ≈ 1e-6); uint8 resizes and OpenCV's filters do not match.
"""

from __future__ import annotations

import numpy as np
from PIL import Image


def to_model_input(rgb: np.ndarray, size: int, mean: list[float], std: list[float]) -> np.ndarray:
    """`rgb` HxWx3 uint8 → normalised float32 [1, 3, size, size]."""
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"expected an HxWx3 uint8 RGB image, got shape {rgb.shape} dtype {rgb.dtype}")
    out = np.empty((1, 3, size, size), dtype=np.float32)
    for c in range(3):
        channel = Image.fromarray(rgb[:, :, c].astype(np.float32) / np.float32(255.0), mode="F")
        resized = np.asarray(channel.resize((size, size), Image.Resampling.BILINEAR), dtype=np.float32)
        out[0, c] = (resized - np.float32(mean[c])) / np.float32(std[c])
    return out


def to_model_coords(points_xy: np.ndarray, image_hw: tuple[int, int], size: int) -> np.ndarray:
    """Pixel coordinates in the original image → the model's `size`×`size` input frame
    (SAM2Transforms.transform_coords with normalize=True)."""
    h, w = image_hw
    scaled = np.asarray(points_xy, dtype=np.float32).copy()
    scaled[..., 0] = scaled[..., 0] / np.float32(w) * np.float32(size)
    scaled[..., 1] = scaled[..., 1] / np.float32(h) * np.float32(size)
    return scaled
