"""Each stage of our generator against the function of Meta's it replaces."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import needs_export_tools
from sam2serve.amg.compact import CompactLogits
from sam2serve.amg.grids import build_all_layer_point_grids, decoder_prompts, generate_crop_boxes
from sam2serve.amg.masks import (
    component_areas,
    fill_holes_and_remove_sprinkles,
    is_box_near_crop_edge,
    mask_to_box,
    remove_small_regions,
    stability_score,
    upsample_logits,
    upsampled_box,
    upsampled_stability_and_box,
)
from sam2serve.amg.nms import nms
from sam2serve.amg.rle import decode_rle, encode_rle, rle_area

FIXTURE = Path(__file__).parent / "fixtures" / "sam2_connected_components.npz"
pytestmark = needs_export_tools


def test_point_grids_match():
    from sam2.utils import amg

    for n, layers, scale in [(32, 0, 1), (16, 2, 2), (7, 1, 1), (5, 2, 2)]:
        ours, ref = build_all_layer_point_grids(n, layers, scale), amg.build_all_layer_point_grids(n, layers, scale)
        assert len(ours) == len(ref)
        for a, b in zip(ours, ref, strict=True):
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize(("n", "layers", "scale"), [(32, 0, 1), (64, 3, 1), (16, 2, 2), (5, 2, 2), (1, 0, 4)])
@pytest.mark.parametrize("m2m", [False, True])
def test_decoder_prompts_count_what_metas_generator_decodes(n, layers, scale, m2m):
    """The work cap's measure: Meta's grids over Meta's crops; with use_m2m each of a prompt's candidates
    (3 with multimask_output) is decoded once more (refine_with_m2m)."""
    from sam2.utils import amg

    from sam2serve.amg.params import GeneratorParams

    grids = amg.build_all_layer_point_grids(n, layers, scale)
    _, layer_of_crop = amg.generate_crop_boxes((480, 640), layers, 512 / 1500)
    prompts = sum(len(grids[layer]) for layer in layer_of_crop)
    params = GeneratorParams(points_per_side=n, crop_n_layers=layers, crop_n_points_downscale_factor=scale,
                             use_m2m=m2m)
    assert decoder_prompts(params) == prompts * (4 if m2m else 1)


@pytest.mark.parametrize("hw", [(1200, 1800), (480, 640), (1000, 333), (64, 64)])
@pytest.mark.parametrize("layers", [0, 1, 2])
def test_crop_boxes_match(hw, layers):
    from sam2.utils import amg

    assert generate_crop_boxes(hw, layers, 512 / 1500) == amg.generate_crop_boxes(hw, layers, 512 / 1500)


def test_upsampling_follows_torch_bilinear_half_pixel():
    import torch
    import torch.nn.functional as F

    logits = np.random.default_rng(0).normal(0, 4, (256, 256)).astype(np.float32)
    for hw in [(1200, 1800), (333, 500), (1024, 1024)]:
        ref = F.interpolate(torch.from_numpy(logits)[None, None], hw, mode="bilinear", align_corners=False)[0, 0]
        ours = upsample_logits(logits, hw)
        assert ours.shape == hw and np.abs(ours - ref.numpy()).max() < 1e-3
        assert np.mean((ours > 0) != (ref.numpy() > 0)) < 1e-4


def test_stability_score_matches():
    import torch
    from sam2.utils.amg import calculate_stability_score

    rng = np.random.default_rng(1)
    for _ in range(5):
        logits = (rng.normal(0, 3, (300, 400)) + np.linspace(-8, 8, 400)[None]).astype(np.float32)
        ref = calculate_stability_score(torch.from_numpy(logits)[None], 0.0, 1.0)[0].item()
        assert stability_score(logits, 0.0, 1.0) == pytest.approx(ref, rel=0, abs=0)
    assert np.isnan(stability_score(np.full((8, 8), -5, np.float32), 0.0, 1.0))  # 0/0 as in torch


def _logit_maps() -> dict[str, np.ndarray]:
    """Low-res maps of the kinds the generator meets: untrained speckle wholly inside ±1, smooth objects
    of several sizes, noise, plateaus exactly at the thresholds, and lone cells at every edge."""
    import cv2

    rng = np.random.default_rng(7)

    def smooth(offset: float) -> np.ndarray:
        return cv2.resize(rng.normal(0, 8, (16, 16)).astype(np.float32), (256, 256),
                          interpolation=cv2.INTER_CUBIC) + np.float32(offset)

    maps = {"speckle": rng.uniform(-0.8, 0.4, (256, 256)), "smooth": smooth(0), "objects": smooth(-12),
            "background": smooth(12), "noise": rng.normal(0, 3, (256, 256))}
    maps |= {f"plateau {v}": np.full((256, 256), v) for v in (-3.0, -1.0, 0.0, 0.5, 1.0)}
    for name, cell in {"corner": (0, 0), "bottom": (255, 128), "right": (100, 255), "inside": (7, 3)}.items():
        spot = np.full((256, 256), -20.0)
        spot[cell] = 1.5
        maps[f"spot {name}"] = spot
    return {name: m.astype(np.float32) for name, m in maps.items()}


@pytest.mark.parametrize("hw", [(1200, 1800), (333, 500), (256, 256), (100, 150), (20, 30), (1, 7)])
@pytest.mark.parametrize("threshold,offset", [(0.0, 1.0), (0.3, 0.7), (-0.5, 0.25)])
def test_stability_and_box_without_full_upsampling_equal_the_full_computation(hw, threshold, offset):
    for name, logits in _logit_maps().items():
        up = upsample_logits(logits, hw)
        expected = (stability_score(up, threshold, offset), mask_to_box(up > threshold))
        stability, box = upsampled_stability_and_box(logits, hw, threshold, offset)
        np.testing.assert_array_equal(box, expected[1], err_msg=name)
        assert stability == expected[0] or (np.isnan(stability) and np.isnan(expected[0])), name


@pytest.mark.parametrize("hw", [(1200, 1800), (2832, 4240), (333, 500), (256, 256), (20, 30), (1, 7)])
@pytest.mark.parametrize("threshold", [0.0, 0.3, -0.5])
def test_box_without_full_upsampling_equals_the_full_computation(hw, threshold):
    for name, logits in _logit_maps().items():
        np.testing.assert_array_equal(upsampled_box(logits, hw, threshold),
                                      mask_to_box(upsample_logits(logits, hw) > threshold), err_msg=name)


@pytest.mark.parametrize("thresholds", [(0.0,), (-1.0, 0.0, 1.0), (-0.25, 0.5, 1.25), (0.0, 0.0, 0.0), (0.0, 1e-4)])
def test_compact_logits_upsample_to_the_same_masks_at_their_thresholds(thresholds):
    """Every pixel of every size decides each threshold as the original map does: the stored candidates' masks and
    stability scores cannot change."""
    for name, logits in _logit_maps().items():
        stored = CompactLogits.encode(logits, thresholds)
        restored = stored.decode()
        assert restored.dtype == np.float32 and restored.shape == logits.shape
        for hw in [(1200, 1800), (333, 500), (256, 256), (100, 150), (20, 30), (1, 7)]:
            expected, got = upsample_logits(logits, hw), upsample_logits(restored, hw)
            for t in thresholds:
                np.testing.assert_array_equal(got > t, expected > t, err_msg=f"{name} {hw} {t}")


def test_compact_logits_of_smooth_maps_are_small_and_noise_is_kept_raw():
    maps = _logit_maps()
    for name, at_most in {"smooth": 1 / 2, "objects": 1 / 5, "background": 1 / 5, "spot corner": 1 / 10,
                          "plateau 0.5": 1 / 10}.items():
        stored = CompactLogits.encode(maps[name], (-1.0, 0.0, 1.0))
        assert stored.raw is None and stored.nbytes < maps[name].nbytes * at_most, name
    noise = maps["noise"]
    stored = CompactLogits.encode(noise, (-1.0, 0.0, 1.0))
    assert stored.raw is not None and stored.nbytes == noise.nbytes
    assert not np.shares_memory(stored.raw, noise)  # a candidate never pins its decoder batch
    nan_map = maps["smooth"].copy()
    nan_map[3, 4] = np.nan
    np.testing.assert_array_equal(CompactLogits.encode(nan_map, (0.0,)).decode(), nan_map)


def test_stability_and_box_of_a_map_below_every_threshold_need_no_upsampling(monkeypatch):
    import sam2serve.amg.masks as masks

    def fail(*_: object) -> None:
        raise AssertionError("upsampled although the low-res logits decide everything")

    monkeypatch.setattr(masks, "upsample_logits", fail)
    stability, box = masks.upsampled_stability_and_box(np.full((256, 256), -4, np.float32), (900, 1200), 0.0, 1.0)
    assert np.isnan(stability) and not box.any()


def test_box_of_a_map_inside_the_stability_band_needs_no_upsampling(monkeypatch):
    """Untrained weights give logits wholly inside mask_threshold ± offset: both stability counts are decided at
    low resolution, and the box comes from the outermost output rows and columns alone."""
    import cv2

    import sam2serve.amg.masks as masks

    rng = np.random.default_rng(3)
    yy, xx = np.mgrid[0:256, 0:256]
    maps = [rng.uniform(-0.8, 0.4, (256, 256)), rng.uniform(-0.9, -0.1, (256, 256))]
    for cy, cx, r in rng.uniform(0, 256, (6, 3)):
        maps.append(0.9 * np.tanh((0.3 * r - np.hypot(yy - cy, xx - cx)) / 10))
    spot = np.full((256, 256), -0.5)
    spot[255, 3] = 0.5
    maps.append(spot)
    cases = [(m.astype(np.float32), hw) for m in maps for hw in [(1200, 1800), (333, 500), (700, 90)]]
    expected = [(stability_score(up := upsample_logits(m, hw), 0.0, 1.0), mask_to_box(up > 0.0)) for m, hw in cases]
    monkeypatch.setattr(masks, "upsample_logits", lambda *_: pytest.fail("upsampled a map inside the band"))
    monkeypatch.setattr(cv2, "resize", lambda *_, **__: pytest.fail("resized a map inside the band"))
    for (m, hw), (stability, box) in zip(cases, expected, strict=True):
        got_stability, got_box = masks.upsampled_stability_and_box(m, hw, 0.0, 1.0)
        np.testing.assert_array_equal(got_box, box)
        assert got_stability == stability


def test_boxes_match_including_empty_masks():
    import torch
    from sam2.utils.amg import batched_mask_to_box

    rng = np.random.default_rng(2)
    masks = rng.random((6, 50, 70)) > 0.995
    masks[0] = False
    ref = batched_mask_to_box(torch.from_numpy(masks)).numpy()
    np.testing.assert_array_equal(np.stack([mask_to_box(m) for m in masks]), ref)


def test_crop_edge_filter_matches():
    import torch
    from sam2.utils.amg import is_box_near_crop_edge as ref_fn

    rng = np.random.default_rng(3)
    boxes = rng.integers(0, 600, (200, 4))
    boxes[:, 2:] = np.maximum(boxes[:, 2:], boxes[:, :2])
    for crop in ([0, 0, 1800, 1200], [300, 200, 900, 800], [1000, 0, 1800, 700]):
        ref = ref_fn(torch.from_numpy(boxes), crop, [0, 0, 1800, 1200]).numpy()
        np.testing.assert_array_equal(is_box_near_crop_edge(boxes, crop, [0, 0, 1800, 1200]), ref)


def test_nms_matches_torchvision_with_ties_and_order():
    import torch
    from torchvision.ops import batched_nms

    rng = np.random.default_rng(4)
    for n in (5, 200, 900):
        xy = rng.integers(0, 100, (n, 2))
        boxes = np.concatenate([xy, xy + rng.integers(1, 60, (n, 2))], axis=1).astype(np.float32)
        scores = np.round(rng.random(n).astype(np.float32), 1)  # many exact ties
        ref = batched_nms(torch.from_numpy(boxes), torch.from_numpy(scores), torch.zeros(n), 0.7).numpy()
        np.testing.assert_array_equal(nms(boxes, scores, 0.7), ref)


def test_rle_round_trip_and_metas_encoding():
    import torch
    from sam2.utils.amg import area_from_rle, coco_encode_rle, mask_to_rle_pytorch

    rng = np.random.default_rng(5)
    for mask in (rng.random((37, 53)) > 0.5, np.zeros((10, 10), bool), np.ones((4, 9), bool)):
        rle = encode_rle(mask)
        np.testing.assert_array_equal(decode_rle(rle), mask)
        meta = mask_to_rle_pytorch(torch.from_numpy(mask)[None])[0]
        assert rle_area(rle) == area_from_rle(meta) == int(mask.sum())
        assert rle["counts"] == coco_encode_rle(meta)["counts"]


def test_connected_components_match_sam2_cuda_kernel():
    """Fixture recorded on an NVIDIA H200 from sam2/csrc/connected_components.cu."""
    data = np.load(FIXTURE)
    masks = np.unpackbits(data["masks_packed"], axis=-1)[..., : int(data["shape"][-1])]
    sys.path.insert(0, str(FIXTURE.parent))
    from make_connected_components_fixture import make_masks

    np.testing.assert_array_equal(masks, make_masks())
    for name, binary in (("foreground", masks), ("background", 1 - masks)):
        ours = np.stack([component_areas(m) for m in binary])
        np.testing.assert_array_equal(ours, data[f"{name}_areas"])


def test_the_reference_cleanup_runs_no_code_of_ours(monkeypatch):
    """Meta's side of the parity harness takes its connected components from scipy.ndimage (matching the
    CUDA kernel's recorded output), never from sam2serve: before, it called our `component_areas`, so the
    low-res cleanup was compared with itself."""
    import torch

    import sam2serve.amg.masks
    from sam2serve_export import reference

    def ours(*args: object) -> None:
        raise AssertionError("the reference called sam2serve's component_areas")

    monkeypatch.setattr(sam2serve.amg.masks, "component_areas", ours)
    monkeypatch.setattr(reference, "component_areas", ours, raising=False)
    data = np.load(FIXTURE)
    masks = np.unpackbits(data["masks_packed"], axis=-1)[..., : int(data["shape"][-1])]
    for name, binary in (("foreground", masks), ("background", 1 - masks)):
        _, areas = reference.cpu_connected_components(torch.from_numpy(binary[:, None].astype(np.uint8)))
        np.testing.assert_array_equal(areas[:, 0].numpy(), data[f"{name}_areas"])


@pytest.mark.parametrize("max_area", [0, 4, 30, 100])
def test_low_res_cleanup_matches_sam2_postprocess(max_area):
    import torch
    from sam2.utils.transforms import SAM2Transforms

    from sam2serve_export.reference import cpu_small_region_kernel

    rng = np.random.default_rng(6)
    logits = (rng.normal(0, 1, (4, 1, 256, 256)) * 3 + np.linspace(-6, 6, 256)[None, None, None]).astype(np.float32)
    transforms = SAM2Transforms(1024, 0.0, max_hole_area=max_area, max_sprinkle_area=max_area)
    with cpu_small_region_kernel():
        ref = transforms.postprocess_masks(torch.from_numpy(logits), (256, 256)).numpy()
    changed = 0
    for i in range(4):
        ours, was_changed = fill_holes_and_remove_sprinkles(logits[i, 0], max_area, 0.0)
        changed += was_changed
        np.testing.assert_allclose(ours, ref[i, 0], atol=1e-5)
    assert (changed > 0) == (max_area > 0)


@pytest.mark.parametrize("mode", ["holes", "islands"])
def test_sam1_output_cleanup_matches(mode):
    from sam2.utils.amg import remove_small_regions as ref_fn

    rng = np.random.default_rng(7)
    for _ in range(4):
        mask = rng.random((80, 90)) > 0.6
        ours, changed = remove_small_regions(mask, 20, mode)
        ref, ref_changed = ref_fn(mask, 20, mode)
        np.testing.assert_array_equal(ours, ref)
        assert changed == ref_changed
