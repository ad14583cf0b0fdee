"""The pictures made from a generation result: palette, combined mask, overlay, individual masks, encoding."""

from __future__ import annotations

import weakref

import cv2
import numpy as np
import pytest

from sam2serve.amg.generator import GenerationResult, MaskRecord
from sam2serve.amg.rle import encode_rle, rle_area
from sam2serve.images import synthetic_scene
from sam2serve.outputs import (
    EncodedImage,
    colour_for,
    combined_mask,
    encode_image,
    individual_mask,
    overlay,
    paint_order,
    palette_lut,
    render_outputs,
)

H, W = 96, 128
BLACK = (0, 0, 0)


def make_record(mask: np.ndarray, iou: float = 0.9) -> MaskRecord:
    """A record as the generator makes one: COCO RLE, area and XYWH box consistent with the mask."""
    mask = mask.astype(bool)
    rle = encode_rle(mask)
    area = int(mask.sum())
    assert rle_area(rle) == area
    ys, xs = np.nonzero(mask)
    bbox = [int(xs.min()), int(ys.min()), int(np.ptp(xs)) + 1, int(np.ptp(ys)) + 1] if area else [0, 0, 0, 0]
    point = [[float(xs.mean()), float(ys.mean())]] if area else [[0.0, 0.0]]
    return MaskRecord(rle, area, bbox, iou, 0.95, point, [0, 0, mask.shape[1], mask.shape[0]])


def box_mask(x0: int, y0: int, x1: int, y1: int, hw: tuple[int, int] = (H, W)) -> np.ndarray:
    mask = np.zeros(hw, bool)
    mask[y0:y1, x0:x1] = True
    return mask


def disc_mask(cx: int, cy: int, r: int, hw: tuple[int, int] = (H, W)) -> np.ndarray:
    mask = np.zeros(hw, np.uint8)
    cv2.circle(mask, (cx, cy), r, 1, -1)
    return mask.astype(bool)


def ring_mask(cx: int, cy: int, r_out: int, r_in: int, hw: tuple[int, int] = (H, W)) -> np.ndarray:
    return disc_mask(cx, cy, r_out, hw) & ~disc_mask(cx, cy, r_in, hw)


def scene_masks() -> list[np.ndarray]:
    """Response order: a large box, a disc inside it, a ring with a hole, a box overlapping the large one."""
    return [box_mask(5, 5, 70, 80), disc_mask(35, 40, 15), ring_mask(100, 30, 20, 8), box_mask(60, 60, 110, 90)]


def result_of(masks: list[np.ndarray], hw: tuple[int, int] = (H, W)) -> GenerationResult:
    return GenerationResult([make_record(m) for m in masks], hw)


def decode(encoded: EncodedImage) -> np.ndarray:
    """Decoded as stored: HxW for grayscale, HxWx3 RGB for colour."""
    array = cv2.imdecode(np.frombuffer(encoded.data, np.uint8), cv2.IMREAD_UNCHANGED)
    assert array is not None
    return array if array.ndim == 2 else array[:, :, ::-1]


# -- palette ---------------------------------------------------------------------------------------------


def test_palette_is_deterministic_pinned_and_distinct():
    colours = [colour_for(i) for i in range(64)]
    # pinned: the same on every run and platform (exact integer hue, IEEE-754 basic operations only)
    assert colours[:4] == [(255, 38, 38), (92, 125, 204), (107, 166, 25), (255, 115, 238)]
    colour_for.cache_clear()
    assert [colour_for(i) for i in range(64)] == colours
    assert len(set(colours)) == 64
    array = np.array(colours, float)
    assert all(isinstance(c, int) and 0 <= c <= 255 for colour in colours for c in colour)
    assert array.max(axis=1).min() >= 128  # never black, nor close to it (black is the background)
    distances = np.sqrt(((array[:, None] - array[None]) ** 2).sum(-1)) + np.eye(64) * 1e9
    assert distances.min() >= 16
    lut = palette_lut(64)
    assert lut.dtype == np.uint8 and lut.shape == (65, 3)
    assert tuple(lut[0]) == BLACK
    assert [tuple(int(v) for v in row) for row in lut[1:]] == colours
    with pytest.raises(ValueError):
        colour_for(-1)


# -- combined mask ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("small_first", [False, True])
def test_small_mask_stays_on_top_of_a_large_one_whatever_the_order(small_first):
    large, small = box_mask(10, 10, 100, 80), box_mask(30, 30, 50, 50)
    masks = [small, large] if small_first else [large, small]
    records = [make_record(m) for m in masks]
    small_i, large_i = (0, 1) if small_first else (1, 0)
    assert paint_order(records) == [large_i, small_i]
    picture = combined_mask(records, (H, W))
    assert picture.shape == (H, W, 3) and picture.dtype == np.uint8
    assert np.all(picture[small] == colour_for(small_i))
    assert np.all(picture[large & ~small] == colour_for(large_i))
    assert np.all(picture[~large] == BLACK)


def test_equal_areas_put_the_earlier_mask_on_top():
    a, b = box_mask(10, 10, 40, 40), box_mask(20, 20, 50, 50)
    picture = combined_mask([make_record(a), make_record(b)], (H, W))
    assert np.all(picture[a] == colour_for(0))
    assert np.all(picture[b & ~a] == colour_for(1))


def test_combined_pixels_are_exactly_the_palette_colours():
    masks = scene_masks()
    records = [make_record(m) for m in masks]
    picture = combined_mask(records, (H, W))
    # the top mask at every pixel: painted largest first, so the smallest covering mask wins
    expected = np.zeros((H, W, 3), np.uint8)
    for i in sorted(range(len(masks)), key=lambda i: -masks[i].sum()):
        expected[masks[i]] = colour_for(i)
    np.testing.assert_array_equal(picture, expected)
    union = np.logical_or.reduce(masks)
    assert np.all(picture[~union] == BLACK)
    assert np.all(picture[disc_mask(100, 30, 7)] == BLACK)  # the ring's hole
    colours = {tuple(int(v) for v in c) for c in picture.reshape(-1, 3)}
    assert colours == {BLACK} | {colour_for(i) for i in range(len(masks))}


def test_combined_mask_refuses_masks_of_another_size():
    record = make_record(box_mask(0, 0, 10, 10, hw=(50, 50)))
    with pytest.raises(ValueError, match="50x50"):
        combined_mask([record], (H, W))


def test_empty_masks_paint_nothing():
    picture = combined_mask([make_record(np.zeros((H, W), bool)), make_record(box_mask(0, 0, 5, 5))], (H, W))
    assert np.all(picture[box_mask(0, 0, 5, 5)] == colour_for(1))
    assert np.count_nonzero(picture.any(axis=2)) == 25


# -- encoding --------------------------------------------------------------------------------------------


def test_png_round_trip_is_exact():
    picture = combined_mask([make_record(m) for m in scene_masks()], (H, W))
    encoded = encode_image(picture, "png", "combined_mask")
    assert encoded.content_type == "image/png"
    assert encoded.file_name == "combined_mask.png"
    assert encoded.data.startswith(b"\x89PNG\r\n\x1a\n")
    assert encoded.file_size == len(encoded.data)
    assert (encoded.width, encoded.height) == (W, H)
    np.testing.assert_array_equal(decode(encoded), picture)  # RGB in, RGB out: channels not swapped
    assert "data" not in repr(encoded)


@pytest.mark.parametrize("mask_dtype", [np.uint8, bool])
def test_binary_mask_is_an_8_bit_grayscale_png(mask_dtype):
    mask = disc_mask(60, 50, 30)
    array = mask.astype(np.uint8) * 255 if mask_dtype is np.uint8 else mask
    encoded = encode_image(array, "png", "mask_000")
    decoded = decode(encoded)
    assert decoded.ndim == 2 and decoded.dtype == np.uint8
    np.testing.assert_array_equal(decoded, mask.astype(np.uint8) * 255)


def test_jpeg_is_decodable_and_close():
    image = synthetic_scene(H, W)
    encoded = encode_image(image, "jpeg", "overlay", jpeg_quality=95)
    assert encoded.content_type == "image/jpeg"
    assert encoded.file_name == "overlay.jpg"
    assert encoded.data.startswith(b"\xff\xd8")
    assert encoded.file_size == len(encoded.data)
    assert (encoded.width, encoded.height) == (W, H)
    decoded = decode(encoded)
    assert decoded.shape == image.shape
    assert np.abs(decoded.astype(int) - image.astype(int)).mean() < 4  # lossy, but the same picture, RGB
    assert encode_image(image, "jpg", "x").content_type == "image/jpeg"


@pytest.mark.parametrize(("array", "fmt"), [
    (np.zeros((4, 4, 3), np.uint8), "gif"),
    (np.zeros((4, 4, 3), np.float32), "png"),
    (np.zeros((4, 4, 5), np.uint8), "png"),
    (np.zeros((0, 4), np.uint8), "png"),
])
def test_encode_refuses_what_it_cannot_write(array, fmt):
    with pytest.raises(ValueError):
        encode_image(array, fmt, "x")


# -- overlay ---------------------------------------------------------------------------------------------


def test_overlay_changes_masked_pixels_only():
    image = synthetic_scene(H, W)
    masks = scene_masks()
    before = image.copy()
    picture = overlay(image, [make_record(m) for m in masks])
    np.testing.assert_array_equal(image, before)  # input untouched
    assert picture.shape == image.shape and picture.dtype == np.uint8
    union = np.logical_or.reduce(masks)
    np.testing.assert_array_equal(picture[~union], image[~union])
    changed = np.any(picture != image, axis=2)
    assert changed[union].mean() > 0.95


def test_overlay_outlines_are_palette_coloured_and_inside_the_masks():
    image = synthetic_scene(H, W)
    masks = scene_masks()
    records = [make_record(m) for m in masks]
    picture = overlay(image, records, alpha=0.0, contour_thickness=1)  # outlines only
    changed = np.any(picture != image, axis=2)
    union = np.logical_or.reduce(masks)
    assert changed.any() and not changed[~union].any()
    palette = {colour_for(i) for i in range(len(records))}
    assert {tuple(int(v) for v in c) for c in picture[changed]} <= palette
    for i, mask in enumerate(masks):  # each mask's edge carries its outline somewhere
        edge = mask & ~cv2.erode(mask.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
        assert np.any(np.all(picture[edge] == colour_for(i), axis=1)), i
    np.testing.assert_array_equal(overlay(image, records, alpha=0.0, contour_thickness=0), image)


def test_overlay_blends_in_the_palette_colour():
    image = np.full((H, W, 3), 100, np.uint8)
    mask = box_mask(20, 20, 60, 60)
    picture = overlay(image, [make_record(mask)], alpha=0.5, contour_thickness=0)
    expected = np.round((np.array(colour_for(0)) + 100) / 2)
    assert np.all(np.abs(picture[mask].astype(int) - expected) <= 1)


def test_overlay_refuses_bad_input():
    with pytest.raises(ValueError):
        overlay(np.zeros((H, W), np.uint8), [])
    with pytest.raises(ValueError):
        overlay(np.zeros((H, W, 3), np.uint8), [], alpha=1.5)


# -- individual masks and render_outputs -----------------------------------------------------------------


def test_individual_mask_is_0_or_255():
    mask = ring_mask(60, 50, 30, 10)
    out = individual_mask(make_record(mask))
    assert out.dtype == np.uint8 and out.shape == (H, W)
    np.testing.assert_array_equal(out, mask.astype(np.uint8) * 255)


def test_render_outputs_png():
    masks = scene_masks()
    result = result_of(masks)
    image = synthetic_scene(H, W)
    out = render_outputs(result, image, "png", include_individual=True, max_masks=None, include_overlay=True)
    assert (out.mask_count, out.dropped) == (4, 0)
    assert out.combined.file_name == "combined_mask.png"
    np.testing.assert_array_equal(decode(out.combined), combined_mask(result.records, (H, W)))
    assert out.overlay is not None and out.overlay.file_name == "overlay.png"
    np.testing.assert_array_equal(decode(out.overlay), overlay(image, result.records))
    assert [e.file_name for e in out.individual] == ["mask_000.png", "mask_001.png", "mask_002.png", "mask_003.png"]
    for encoded, mask in zip(out.individual, masks, strict=True):
        decoded = decode(encoded)
        assert decoded.ndim == 2 and set(np.unique(decoded)) <= {0, 255}
        np.testing.assert_array_equal(decoded, mask.astype(np.uint8) * 255)
        assert (encoded.width, encoded.height, encoded.file_size) == (W, H, len(encoded.data))
    assert set(out.timings) == {"render", "encode"}


def test_render_outputs_jpeg_and_defaults():
    out = render_outputs(result_of(scene_masks()), None, "jpeg", include_individual=True, max_masks=None)
    assert out.overlay is None  # only when asked
    for encoded in [out.combined, *out.individual]:
        assert encoded.content_type == "image/jpeg" and encoded.file_name.endswith(".jpg")
        assert decode(encoded).shape[:2] == (H, W)
    assert decode(out.individual[0]).ndim == 2
    none = render_outputs(result_of(scene_masks()), None, "png", include_individual=False, max_masks=None)
    assert none.individual == []


def test_max_masks_keeps_the_first_in_response_order():
    masks = scene_masks()
    result = result_of(masks)
    out = render_outputs(result, None, "png", include_individual=True, max_masks=2)
    assert (out.mask_count, out.dropped) == (2, 2)
    assert [e.file_name for e in out.individual] == ["mask_000.png", "mask_001.png"]
    for encoded, mask in zip(out.individual, masks[:2], strict=True):
        np.testing.assert_array_equal(decode(encoded), mask.astype(np.uint8) * 255)
    combined = decode(out.combined)
    np.testing.assert_array_equal(combined, combined_mask(result.records[:2], (H, W)))
    assert {tuple(int(v) for v in c) for c in combined.reshape(-1, 3)} == {BLACK, colour_for(0), colour_for(1)}
    assert len(result.records) == 4  # the result itself is not truncated

    zero = render_outputs(result, None, "png", include_individual=True, max_masks=0)
    assert (zero.mask_count, zero.dropped, zero.individual) == (0, 4, [])
    assert not decode(zero.combined).any()
    assert render_outputs(result, None, "png", True, max_masks=10).mask_count == 4
    with pytest.raises(ValueError):
        render_outputs(result, None, "png", True, max_masks=-1)


def test_empty_result_gives_an_all_black_combined_mask():
    image = synthetic_scene(H, W)
    out = render_outputs(GenerationResult([], (H, W)), image, "png", include_individual=True, max_masks=None,
                         include_overlay=True)
    combined = decode(out.combined)
    assert combined.shape == (H, W, 3) and not combined.any()
    assert out.individual == [] and (out.mask_count, out.dropped) == (0, 0)
    assert out.overlay is not None
    np.testing.assert_array_equal(decode(out.overlay), image)


def test_render_outputs_refuses_bad_requests():
    result = result_of(scene_masks())
    with pytest.raises(ValueError, match="format"):
        render_outputs(result, None, "gif", True, None)
    with pytest.raises(ValueError, match="overlay"):
        render_outputs(result, None, "png", True, None, include_overlay=True)
    with pytest.raises(ValueError):
        render_outputs(result, np.zeros((H + 1, W, 3), np.uint8), "png", True, None, include_overlay=True)


class _TrackedRecord(MaskRecord):
    """Counts its decoded masks that are still alive, across all instances."""

    live: set[int] = set()  # noqa: RUF012
    peak = 0

    def mask(self) -> np.ndarray:
        mask = super().mask()
        key = id(mask)
        _TrackedRecord.live.add(key)
        _TrackedRecord.peak = max(_TrackedRecord.peak, len(_TrackedRecord.live))
        weakref.finalize(mask, _TrackedRecord.live.discard, key)
        return mask


def test_one_full_resolution_mask_at_a_time():
    masks = [*scene_masks(), np.zeros((H, W), bool)]
    records = [_TrackedRecord(**vars(make_record(m))) for m in masks]
    _TrackedRecord.live.clear()
    _TrackedRecord.peak = 0
    render_outputs(GenerationResult(records, (H, W)), synthetic_scene(H, W), "png", include_individual=True,
                   max_masks=None, include_overlay=True)
    assert _TrackedRecord.peak == 1
    assert not _TrackedRecord.live


class _COrderRecord(MaskRecord):
    def mask(self) -> np.ndarray:
        return np.ascontiguousarray(super().mask())


def test_individual_mask_whatever_the_decoded_memory_order():
    mask = ring_mask(60, 50, 30, 10)
    for record in (make_record(mask), _COrderRecord(**vars(make_record(mask)))):
        out = individual_mask(record)
        assert out.flags.c_contiguous
        np.testing.assert_array_equal(out, mask.astype(np.uint8) * 255)
