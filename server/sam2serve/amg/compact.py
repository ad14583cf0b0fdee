"""Candidates' low-res logits held compactly until NMS decides which are needed, exact where it matters.

At zero thresholds every candidate of a crop (3 per prompt: 3072 at 32²) waits for box NMS; as float32 256×256 maps
that is 0.8 GB. Later stages only threshold the bilinear upsampling of a map, at the mask threshold (and at
threshold ± offset when stability is computed after NMS). An output pixel is a convex combination of one 2×2 block
of low-res cells, so where a block's four cells all lie in the same interval between those thresholds, clear of
them by a margin that covers float rounding, any values in that interval give the same decisions. Such cells keep
only their interval and come back as one representative value of it; cells of other blocks are kept exactly,
which makes every upsampled pixel that reads them bit-identical. Smooth maps keep a thin band along their contours;
a map with more band than a raw copy would cost is kept raw.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import pairwise

import cv2
import numpy as np

from .masks import CONVEX_MARGIN

# Threshold crossings per cell along rows above which a map is kept raw without trying (smooth maps cross a few
# times per row, ~0.02 per cell; a compact form saves nothing beyond ~0.3).
NOISE_CROSSINGS = 0.25


@dataclass(frozen=True)
class CompactLogits:
    """One low-res logit map that upsamples to the same thresholded masks as the original (`decode`)."""

    shape: tuple[int, int]
    raw: np.ndarray | None  # the map itself, when compacting would not save memory
    levels: tuple[np.ndarray, ...] = ()  # packed bit-planes of each cell's interval index
    exact_at: np.ndarray | None = None  # packed bits: cells kept exactly
    exact: np.ndarray | None = None  # their values, float32, in C order
    representatives: np.ndarray | None = None  # float32, one per interval

    @classmethod
    def encode(cls, logits: np.ndarray, thresholds: Sequence[float]) -> CompactLogits:
        """`thresholds`: every threshold the upsampled map will be compared with (strictly greater than)."""
        v = np.asarray(logits, np.float32)
        if v.ndim != 2:
            raise ValueError(f"expected a 2-D logit map, got shape {v.shape}")
        shape = (int(v.shape[0]), int(v.shape[1]))
        if min(shape) < 2:
            return cls(shape, np.array(v, copy=True))
        # Noise (untrained weights) crosses the (middle) threshold between most neighbouring cells and would be kept
        # nearly whole: every 16th row tells at a small fraction of the cost of finding out.
        rows, middle = v[::16], np.float32(sorted(thresholds)[len(thresholds) // 2])
        if np.count_nonzero(np.diff(rows > middle, axis=1)) > NOISE_CROSSINGS * rows.size:
            return cls(shape, np.array(v, copy=True))
        high, low = v.max(), v.min()
        peak = max(abs(float(high)), abs(float(low)))
        if not np.isfinite(peak):
            return cls(shape, np.array(v, copy=True))
        # A band the whole map lies above or below decides nothing between cells: it is left out.
        bands = [(lo, hi) for lo, hi in _merged_bands(thresholds, CONVEX_MARGIN * peak) if not (low > hi or high <= lo)]
        if not bands:  # every cell on the same side of every threshold, clear of it: any one value will do
            return cls(shape, None, (np.zeros(-(-v.size // 8), np.uint8),), np.zeros(-(-v.size // 8), np.uint8),
                       np.zeros(0, np.float32), np.array([v.flat[0]], np.float32))
        # Per cell, how many band edges lie below it: odd means inside a band (kept exactly), even is twice the
        # index of the interval between bands.
        band = np.zeros(shape, np.uint8)
        for low, high in bands:
            band += v > low
            band += v > high
        # A cell is kept exactly unless the four 2×2 blocks that hold it, i.e. its 3×3 neighbourhood, all lie in its
        # interval (equal and even band indices).
        window = np.ones((3, 3), np.uint8)
        exact_at = (cv2.dilate(band, window) != cv2.erode(band, window)) | (band & 1).view(bool)
        n_planes = max(1, len(bands).bit_length())
        exact_count = int(np.count_nonzero(exact_at))
        if 4 * exact_count + (n_planes + 1) * (-(-v.size // 8)) >= v.nbytes:
            return cls(shape, np.array(v, copy=True))
        exact = v[exact_at]
        level = band >> 1
        planes = tuple(np.packbits((level >> bit) & 1) for bit in range(n_planes))
        return cls(shape, None, planes, np.packbits(exact_at), exact, _representatives(bands))

    def decode(self) -> np.ndarray:
        """A float32 map whose upsampling thresholds exactly as the original's at the encoded thresholds."""
        if self.raw is not None:
            return self.raw
        assert self.exact_at is not None and self.exact is not None and self.representatives is not None
        size = self.shape[0] * self.shape[1]
        level = np.zeros(size, np.uint8)
        for bit, plane in enumerate(self.levels):
            level |= np.unpackbits(plane, count=size) << bit
        out = self.representatives[level].reshape(self.shape)
        out[np.unpackbits(self.exact_at, count=size).reshape(self.shape).view(bool)] = self.exact
        return out

    @property
    def nbytes(self) -> int:
        if self.raw is not None:
            return int(self.raw.nbytes)
        parts = [*self.levels, self.exact_at, self.exact, self.representatives]
        return sum(int(p.nbytes) for p in parts if p is not None)


def _representatives(bands: list[tuple[np.float32, np.float32]]) -> np.ndarray:
    """A value for each interval between bands that every cell left in it may take: the bands' own edges outside
    them, midpoints between them (a cell is left in an interval only when its whole block lies there, at or
    beyond the edges)."""
    inner = [(high + low) / np.float32(2) for (_, high), (low, _) in pairwise(bands)]
    return np.array([bands[0][0], *inner, bands[-1][1]], np.float32)


def _merged_bands(thresholds: Sequence[float], margin: float) -> list[tuple[np.float32, np.float32]]:
    """[t - margin, t + margin] around each threshold, sorted, overlapping ones merged (a cell near two thresholds
    that lie close together is near one band)."""
    bands: list[list[float]] = []
    for t in sorted(float(t) for t in thresholds):
        if bands and t - margin <= bands[-1][1]:
            bands[-1][1] = t + margin
        else:
            bands.append([t - margin, t + margin])
    return [(np.float32(low), np.float32(high)) for low, high in bands]
