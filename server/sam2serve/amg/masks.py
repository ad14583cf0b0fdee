"""Per-mask arithmetic of the generator: upsampling, stability, boxes, crop-edge test, small regions."""

from __future__ import annotations

from functools import lru_cache

import cv2
import numpy as np

# A bilinear output pixel is a convex combination of 2×2 low-res cells, so it lies within their range; the
# margin (relative to the largest |logit|) covers float rounding in that combination.
CONVEX_MARGIN = 1e-4
# An output value we evaluate with cv2's taps and weights differs from cv2's by a few float32 roundings of the
# largest |logit| at most (cv2 may fuse a multiply-add): a threshold is decided only when cleared by more.
_EVALUATION_MARGIN = 1e-6


def upsample_logits(low_res: np.ndarray, size_hw: tuple[int, int]) -> np.ndarray:
    """[256, 256] logits → [H, W], bilinear with half-pixel centres (F.interpolate, align_corners=False)."""
    h, w = size_hw
    return cv2.resize(low_res, (w, h), interpolation=cv2.INTER_LINEAR)


def stability_score(logits: np.ndarray, mask_threshold: float, offset: float) -> np.float32:
    """IoU of the masks thresholded at threshold ± offset (the high one lies inside the low one)."""
    inter = np.count_nonzero(logits > (mask_threshold + offset))
    union = np.count_nonzero(logits > (mask_threshold - offset))
    return _stability_from_counts(inter, union)


def _stability_from_counts(inter: int | np.integer, union: int | np.integer) -> np.float32:
    if union == 0:
        return np.float32(np.nan)  # 0/0, as in the reference
    return np.float32(inter) / np.float32(union)


def upsampled_stability_and_box(low_res: np.ndarray, size_hw: tuple[int, int], mask_threshold: float,
                                offset: float) -> tuple[np.float32, np.ndarray]:
    """`stability_score` and `mask_to_box(> mask_threshold)` of `upsample_logits(low_res, size_hw)`, with
    the same result but less full-resolution work: a threshold the whole low-res map lies on one side of
    gives its count (0 or every pixel) without upsampling, and the other thresholds are counted only inside
    the output rows and columns that can hold a value above `mask_threshold - offset`."""
    h, w = size_hw
    row_high, col_high = low_res.max(axis=1), low_res.max(axis=0)
    high, low = float(row_high.max()), float(low_res.min())
    margin = CONVEX_MARGIN * max(abs(high), abs(low))
    t_low, t_high = mask_threshold - offset, mask_threshold + offset
    if high + margin <= t_low:  # nothing above even the low threshold: 0/0, as the reference gets
        return np.float32(np.nan), np.zeros(4, np.int64)
    rows = _output_span(row_high, t_low - margin, h)
    cols = _output_span(col_high, t_low - margin, w)
    lazy: dict[str, np.ndarray] = {}

    def upsampled() -> np.ndarray:  # a view: pixels outside are all <= t_low
        if "up" not in lazy:
            lazy["up"] = upsample_logits(low_res, size_hw)[rows, cols]
        return lazy["up"]

    def count_above(threshold: float) -> int:
        if high + margin <= threshold:
            return 0
        if low - margin > threshold:
            return h * w
        return cv2.countNonZero((upsampled() > threshold).view(np.uint8))

    stability = _stability_from_counts(count_above(t_high), count_above(t_low))
    if high + margin <= mask_threshold:
        return stability, np.zeros(4, np.int64)
    if low - margin > t_low and high + margin <= t_high:  # the counts needed no upsampled pixel: nor does the box
        box = _box_from_edges(low_res, row_high, col_high, size_hw, mask_threshold, margin,
                              _EVALUATION_MARGIN * max(abs(high), abs(low)))
        if box is not None:
            return stability, box
    return stability, _box_in_span(upsampled() > mask_threshold, rows, cols)


def upsampled_box(low_res: np.ndarray, size_hw: tuple[int, int], mask_threshold: float) -> np.ndarray:
    """`mask_to_box(upsample_logits(low_res, size_hw) > mask_threshold)`, from the mask's outermost rows and columns
    where they can be decided exactly (no upsampling), else from the upsampled rows and columns that can hold a
    value above the threshold."""
    h, w = size_hw
    row_high, col_high = low_res.max(axis=1), low_res.max(axis=0)
    high, low = float(row_high.max()), float(low_res.min())
    peak = max(abs(high), abs(low))
    margin = CONVEX_MARGIN * peak
    if high + margin <= mask_threshold:
        return np.zeros(4, np.int64)
    box = _box_from_edges(low_res, row_high, col_high, size_hw, mask_threshold, margin, _EVALUATION_MARGIN * peak)
    if box is not None:
        return box
    rows = _output_span(row_high, mask_threshold - margin, h)
    cols = _output_span(col_high, mask_threshold - margin, w)
    return _box_in_span(upsample_logits(low_res, size_hw)[rows, cols] > mask_threshold, rows, cols)


def _box_in_span(mask: np.ndarray, rows: slice, cols: slice) -> np.ndarray:
    """`mask_to_box` of a full-size mask that is empty outside `mask`, its [rows, cols] window."""
    x, y, bw, bh = cv2.boundingRect(mask.view(np.uint8))
    if bw == 0:
        return np.zeros(4, np.int64)
    x, y = x + cols.start, y + rows.start
    return np.array([x, y, x + bw - 1, y + bh - 1], np.int64)


@lru_cache(maxsize=64)
def _linear_taps(n_src: int, n_dst: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """cv2.resize's INTER_LINEAR taps along one axis: first source index, second, and their float32 weights."""
    f = ((np.arange(n_dst) + 0.5) * (n_src / n_dst) - 0.5).astype(np.float32)
    first = np.floor(f).astype(np.int64)
    frac = (f - first.astype(np.float32)).astype(np.float32)
    clamp = (first < 0) | (first >= n_src - 1)
    frac[clamp] = 0.0
    first = np.clip(first, 0, n_src - 1)
    second = np.minimum(first + 1, n_src - 1)
    taps = (first, second, (1.0 - frac).astype(np.float32), frac)
    for a in taps:
        a.flags.writeable = False
    return taps


def _box_from_edges(low_res: np.ndarray, row_high: np.ndarray, col_high: np.ndarray, size_hw: tuple[int, int],
                    threshold: float, margin: float, tolerance: float) -> np.ndarray | None:
    """The box of `upsample_logits(low_res, size_hw) > threshold` from its outermost rows and columns only.
    Output lines are evaluated one at a time from each side with the resize's own taps and weights, skipping
    lines whose low-res sources all lie below the threshold by `margin` (a bilinear value is a convex combination
    of its sources); a line is decided only when its largest value clears the threshold by `tolerance`, which
    covers any difference in float rounding from cv2's passes (or their order: columns are interpolated vertically
    first). `row_high`, `col_high`: the low-res rows' and columns' maxima. None when a line is too close to call."""
    h, w = size_hw
    y0, y1, b0, b1 = _linear_taps(low_res.shape[0], h)
    x0, x1, a0, a1 = _linear_taps(low_res.shape[1], w)

    # An output line mixes two low-res lines, each interpolated along the line first: those are shared by the
    # neighbouring output lines, so each is computed once.
    across_rows: dict[int, np.ndarray] = {}
    along_columns: dict[int, np.ndarray] = {}

    def low_res_row(i: int) -> np.ndarray:
        if i not in across_rows:
            across_rows[i] = low_res[i, x0] * a0 + low_res[i, x1] * a1
        return across_rows[i]

    def low_res_column(j: int) -> np.ndarray:
        if j not in along_columns:
            along_columns[j] = low_res[y0, j] * b0 + low_res[y1, j] * b1
        return along_columns[j]

    def row(y: int) -> np.ndarray:
        return low_res_row(int(y0[y])) * b0[y] + low_res_row(int(y1[y])) * b1[y]

    def column(x: int) -> np.ndarray:
        return low_res_column(int(x0[x])) * a0[x] + low_res_column(int(x1[x])) * a1[x]

    row_may = np.maximum(row_high[y0], row_high[y1]) > threshold - margin
    col_may = np.maximum(col_high[x0], col_high[x1]) > threshold - margin
    edges = []
    for line, may in ((row, row_may), (column, col_may)):
        candidates = np.flatnonzero(may)
        for order in (candidates, candidates[::-1]):
            for i in order:
                top = float(line(int(i)).max())
                if top > threshold + tolerance:
                    edges.append(int(i))
                    break
                if top > threshold - tolerance:
                    return None  # too close to call
            else:
                return np.zeros(4, np.int64)  # nothing above the threshold
    (y_first, y_last), (x_first, x_last) = edges[:2], edges[2:]
    return np.array([x_first, y_first, x_last, y_last], np.int64)


@lru_cache(maxsize=64)
def _source_span(n_src: int, n_dst: int) -> tuple[np.ndarray, np.ndarray]:
    """First and last low-res index each output index of a bilinear resize can read (one more on each side
    than the sampling position needs, so its rounding never matters)."""
    position = np.floor((np.arange(n_dst) + 0.5) * (n_src / n_dst) - 0.5).astype(np.int64)
    first, last = np.clip(position - 1, 0, n_src - 1), np.clip(position + 2, 0, n_src - 1)
    first.flags.writeable = last.flags.writeable = False
    return first, last


def _output_span(line_max: np.ndarray, threshold: float, n_dst: int) -> slice:
    """Output indices along one axis that read a low-res line whose maximum exceeds `threshold`."""
    candidates = np.flatnonzero(line_max > threshold)
    if candidates.size == 0:
        return slice(0, 0)
    first, last = _source_span(len(line_max), n_dst)
    start = int(np.searchsorted(last, candidates[0], side="left"))
    stop = int(np.searchsorted(first, candidates[-1], side="right"))
    return slice(start, stop)


def mask_to_box(mask: np.ndarray) -> np.ndarray:
    """XYXY box with inclusive max coordinates; [0, 0, 0, 0] for an empty mask (batched_mask_to_box)."""
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return np.zeros(4, np.int64)
    cols = np.flatnonzero(mask.any(axis=0))
    return np.array([cols[0], rows[0], cols[-1], rows[-1]], np.int64)


def is_box_near_crop_edge(boxes: np.ndarray, crop_box: list[int], orig_box: list[int],
                          atol: float = 20.0) -> np.ndarray:
    """Boxes (crop frame) within `atol` of a crop edge that is not also an image edge."""
    crop = np.asarray(crop_box, np.float32)
    boxes = (boxes + np.array([crop_box[0], crop_box[1]] * 2)).astype(np.float32)
    near_crop = np.abs(boxes - crop[None]) <= atol
    near_image = np.abs(boxes - np.asarray(orig_box, np.float32)[None]) <= atol
    return np.any(near_crop & ~near_image, axis=1)


def component_areas(binary: np.ndarray) -> np.ndarray:
    """Area of the 8-connected component each nonzero pixel belongs to (0 elsewhere) — what SAM 2's
    CUDA kernel `get_connected_componnets` returns as counts."""
    _, labels, stats, _ = cv2.connectedComponentsWithStats(binary.astype(np.uint8), connectivity=8)
    areas = stats[:, cv2.CC_STAT_AREA].astype(np.int32)[labels]
    areas[labels == 0] = 0
    return areas


def fill_holes_and_remove_sprinkles(logits: np.ndarray, max_area: int,
                                    mask_threshold: float) -> tuple[np.ndarray, bool]:
    """SAM2Transforms.postprocess_masks' cleanup of one low-res logit map: background components of at
    most `max_area` pixels become threshold+10, then foreground components (of the *original* map) of at
    most `max_area` become threshold-10. Returns the map and whether anything changed."""
    if max_area <= 0:
        return logits, False
    out = logits
    background = logits <= mask_threshold
    holes = background & (component_areas(background) <= max_area)
    if holes.any():
        out = np.where(holes, np.float32(mask_threshold + 10.0), out)
    foreground = ~background
    sprinkles = foreground & (component_areas(foreground) <= max_area)
    if sprinkles.any():
        out = np.where(sprinkles, np.float32(mask_threshold - 10.0), out)
    return out, out is not logits


def remove_small_regions(mask: np.ndarray, area_thresh: float, mode: str) -> tuple[np.ndarray, bool]:
    """SAM 1's output-resolution cleanup (sam2.utils.amg.remove_small_regions): mode "holes" or "islands"."""
    correct_holes = mode == "holes"
    working = (correct_holes ^ mask).astype(np.uint8)
    n_labels, regions, stats, _ = cv2.connectedComponentsWithStats(working, connectivity=8)
    sizes = stats[:, -1][1:]
    small = [i + 1 for i, s in enumerate(sizes) if s < area_thresh]
    if not small:
        return mask, False
    fill_labels = [0, *small]
    if not correct_holes:
        fill_labels = [i for i in range(n_labels) if i not in fill_labels]
        if not fill_labels:  # every region is below threshold: keep the largest
            fill_labels = [int(np.argmax(sizes)) + 1]
    return np.isin(regions, fill_labels), True
