"""Local image files for the command-line tools (the server's inputs go through sam2serve.inputs)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .inputs import InputLimits, decode_image

# Files the operator chose on their own machine: the same decoder as requests, with generous caps.
LOCAL_FILE_LIMITS = InputLimits(max_image_bytes=1 << 31, max_pixels=250_000_000)


def read_rgb(source: Path | str | bytes) -> np.ndarray:
    """HxWx3 uint8 RGB (EXIF orientation applied) from a path or encoded bytes."""
    data = source if isinstance(source, bytes) else Path(source).read_bytes()
    return decode_image(data, LOCAL_FILE_LIMITS, field="image" if isinstance(source, bytes) else str(source))


def synthetic_scene(height: int = 480, width: int = 640, seed: int = 0) -> np.ndarray:
    """A deterministic picture of flat-coloured shapes on a gradient, for tests and offline checks."""
    import cv2

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    image = np.stack([(x * 255 // max(width - 1, 1)), (y * 255 // max(height - 1, 1)),
                      np.full_like(x, 96)], axis=-1).astype(np.uint8)
    for _ in range(8):
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        cx, cy = int(rng.integers(0, width)), int(rng.integers(0, height))
        if rng.random() < 0.5:
            cv2.circle(image, (cx, cy), int(rng.integers(15, max(16, min(height, width) // 4))), colour, -1)
        else:
            w, h = int(rng.integers(20, width // 3)), int(rng.integers(20, height // 3))
            cv2.rectangle(image, (cx, cy), (min(cx + w, width - 1), min(cy + h, height - 1)), colour, -1)
    return image
