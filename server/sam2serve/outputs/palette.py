"""A deterministic palette of visually distinct colours, one per mask index.

Hue steps by the golden ratio (Fibonacci hashing in exact integer arithmetic, so index *i* gets the same
hue on every run, platform and Python), which keeps consecutive indices far apart on the colour wheel.
Indices whose hues nearly coincide are those a Fibonacci number apart (13, 21, 34, 55, ...); cycling
saturation over 2 levels and value over 3 levels separates most of those pairs as well. Value never drops
below 0.65, so no colour is near black: black is the background of the combined mask.
"""

from __future__ import annotations

import colorsys
from functools import lru_cache

import numpy as np

_GOLDEN_64 = 0x9E3779B97F4A7C15  # 2**64 / φ, rounded to odd: Knuth's multiplicative (Fibonacci) hashing
_SATURATIONS = (0.85, 0.55)
_VALUES = (1.0, 0.8, 0.65)


@lru_cache(maxsize=4096)
def colour_for(index: int) -> tuple[int, int, int]:
    """RGB colour (0–255 each) of the mask at position `index` (≥ 0) of a response."""
    if index < 0:
        raise ValueError(f"palette index must be >= 0, got {index}")
    hue = ((index * _GOLDEN_64) % 2**64) / 2**64  # exact integer product; one correctly rounded division
    s = _SATURATIONS[index % len(_SATURATIONS)]
    v = _VALUES[index % len(_VALUES)]
    r, g, b = colorsys.hsv_to_rgb(hue, s, v)  # only IEEE-754 basic operations: identical everywhere
    return round(r * 255), round(g * 255), round(b * 255)


def palette_lut(n: int) -> np.ndarray:
    """uint8 [n + 1, 3] lookup table: row 0 is black (background), row k + 1 is `colour_for(k)`."""
    lut = np.zeros((n + 1, 3), np.uint8)
    for k in range(n):
        lut[k + 1] = colour_for(k)
    return lut
