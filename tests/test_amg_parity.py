"""Our generator against Meta's SAM2AutomaticMaskGenerator, end to end.

The synthetic decoder feeds both generators identical, image-dependent decoder outputs, chosen so that
every filter removes some candidates and keeps others; untrained engines check the real engines path.
"""

from __future__ import annotations

from dataclasses import replace
from itertools import pairwise

import numpy as np
import pytest

from conftest import needs_export_tools, shared_image
from sam2serve.amg import AutoMaskGenerator, GeneratorParams
from sam2serve.amg.params import fal_defaults
from sam2serve.domain import Unsupervised
from sam2serve.engines.manifest import read_manifest
from sam2serve.engines.onnx_engine import OnnxEngine
from sam2serve.images import read_rgb, synthetic_scene

pytestmark = needs_export_tools
MIN_MIOU = 0.999
CONFIGS = {
    "default": GeneratorParams(points_per_side=16),
    "fal": replace(fal_defaults(), points_per_side=16),
    "crop_n_layers=1": GeneratorParams(points_per_side=16, crop_n_layers=1),
    "use_m2m": GeneratorParams(points_per_side=16, use_m2m=True),
}


@pytest.fixture(scope="module")
def synthetic_pair(tiny_engine_dir):
    from sam2serve_export.checkpoint import build_untrained_model
    from sam2serve_export.models import get_model_spec
    from sam2serve_export.synthetic import SyntheticEngine, inject_synthetic_decoder

    manifest = read_manifest(tiny_engine_dir)
    model = build_untrained_model(get_model_spec(manifest.model), 0)
    inject_synthetic_decoder(model)
    return model, AutoMaskGenerator(SyntheticEngine(manifest))


def _compare(model, generator, image, params):
    from sam2serve_export.parity import compare_masks
    from sam2serve_export.reference import run_reference

    result = generator.generate(image, params)
    return compare_masks(run_reference(model, image, params), result.records), result.counts


def _assert_parity(report):
    assert report.reference_masks == report.our_masks
    assert report.mean_iou >= MIN_MIOU
    assert report.unmatched_reference == report.unmatched_ours == 0
    assert report.max_delta_predicted_iou < 1e-6 and report.max_delta_stability < 1e-3
    assert report.same_order


def test_synthetic_decoder_parity_and_every_filter_acts(synthetic_pair):
    model, generator = synthetic_pair
    image = synthetic_scene(480, 640, seed=3)
    seen, engine = {}, generator.engine
    for name, params in CONFIGS.items():
        engine.prompts = engine.masked_prompts = 0
        report, counts = _compare(model, generator, image, params)
        _assert_parity(report)
        assert report.our_masks > 3, name
        seen[name] = counts
        if name in ("default", "fal"):  # the production path: IoU first, masks for the prompts that need them
            assert engine.prompts == counts["candidates"] // 3 and 0 < engine.masked_prompts < engine.prompts, name
    default, fal, crops = seen["default"], seen["fal"], seen["crop_n_layers=1"]
    assert 0 < default["after_iou"] < default["candidates"]
    assert 0 < default["after_stability"] < default["after_iou"]
    assert 0 < default["after_box_nms"] < default["after_crop_edge"]
    assert 0 < crops["after_crop_edge"] < crops["after_stability"]
    assert 0 < crops["after_crop_nms"] < crops["after_box_nms"]
    assert fal["low_res_cleaned"] > 0


@pytest.mark.parametrize("name", ["truck.jpg", "groceries.jpg"])
def test_synthetic_decoder_parity_on_real_photos(synthetic_pair, name):
    model, generator = synthetic_pair
    image = read_rgb(shared_image(name))
    for params in CONFIGS.values():
        report, _ = _compare(model, generator, image, params)
        _assert_parity(report)


def test_untrained_engines_end_to_end_match_the_torch_model(tiny_engine_dir, tiny_model):
    """ONNX engines + our generator vs the torch model + Meta's generator; thresholds at 0 so that the
    single (degenerate) mask of untrained weights reaches the output."""
    engine = OnnxEngine(tiny_engine_dir, providers=["CPUExecutionProvider"], warmup=False)
    params = GeneratorParams(points_per_side=4, pred_iou_thresh=0.0, stability_score_thresh=0.0)
    report, counts = _compare(tiny_model, AutoMaskGenerator(engine), synthetic_scene(), params)
    assert counts["candidates"] == 48 and report.our_masks >= 1
    assert report.reference_masks == report.our_masks and report.mean_iou >= MIN_MIOU


def test_untrained_engines_through_the_iou_first_path_match_the_torch_model(tiny_engine_dir, tiny_model):
    """The factored prompt head ranks prompts, the mask head runs for those with a candidate above the threshold;
    against Meta's generator on the torch model. The threshold sits inside the narrow IoU range of untrained
    weights so that some prompts pass and others do not."""
    from sam2serve.amg.grids import build_all_layer_point_grids
    from sam2serve.preprocess import to_model_coords, to_model_input

    engine = OnnxEngine(tiny_engine_dir, providers=["CPUExecutionProvider"], warmup=False)
    image, m = synthetic_scene(), engine.manifest
    features = engine.encode(to_model_input(image, m.image_size, m.pixel_mean, m.pixel_std))
    points = build_all_layer_point_grids(4, 0, 1)[0] * np.array(image.shape[1::-1])
    coords = to_model_coords(points.astype(np.float32), image.shape[:2], m.image_size)[:, None]
    best = np.sort(engine.factored.prompt_head(features, coords, np.ones((16, 1), np.float32))[0][:, 1:].max(1))
    assert best[0] < best[-1], "untrained weights gave every prompt the same IoU"
    threshold = float(best[7] + best[8]) / 2  # about half the prompts have a candidate above it
    params = GeneratorParams(points_per_side=4, pred_iou_thresh=threshold, stability_score_thresh=0.0)
    before = engine.factored.stats.as_dict()
    report, counts = _compare(tiny_model, AutoMaskGenerator(engine), image, params)
    after = engine.factored.stats.as_dict()
    assert after["prompts"] - before["prompts"] == 16
    assert 0 < after["masked_prompts"] - before["masked_prompts"] < 16
    assert 0 < counts["after_iou"] < counts["candidates"] and report.our_masks >= 1
    assert report.reference_masks == report.our_masks and report.mean_iou >= MIN_MIOU


def test_cancellation_stops_at_a_batch_boundary(synthetic_pair):
    from sam2serve.amg.generator import Cancelled

    _, generator = synthetic_pair
    calls = []

    class StopAfterTwoBatches(Unsupervised):
        def should_stop(self) -> bool:
            calls.append(1)
            return len(calls) > 2

    with pytest.raises(Cancelled):
        generator.generate(synthetic_scene(), GeneratorParams(points_per_side=16, points_per_batch=16),
                           StopAfterTwoBatches())
    assert len(calls) == 3


def test_progress_counts_every_prompt(synthetic_pair):
    _, generator = synthetic_pair
    seen = []

    class Progress(Unsupervised):
        def progress(self, done: int, total: int) -> None:
            seen.append((done, total))

    generator.generate(synthetic_scene(), GeneratorParams(points_per_side=8, crop_n_layers=1), Progress())
    assert seen[-1] == (64 * 5, 64 * 5) and all(a <= b for (a, _), (b, _) in pairwise(seen))


@pytest.mark.parametrize("crop_n_layers", [0, 1])
def test_zero_thresholds_match_with_stability_after_nms_and_compact_candidates(synthetic_pair, monkeypatch,
                                                                             crop_n_layers):
    """Without IoU and stability thresholds every candidate waits for NMS, held compactly, and stability is computed
    for the survivors only: masks and scores still match Meta's, and the candidates take a fraction of the memory
    of their float32 logits."""
    import sam2serve.amg.generator as generator_module

    model, generator = synthetic_pair
    encode, stored = generator_module.CompactLogits.encode, []

    def recording_encode(logits, thresholds):
        stored.append((encode(logits, thresholds), logits.nbytes, tuple(thresholds)))
        return stored[-1][0]

    monkeypatch.setattr(generator_module.CompactLogits, "encode", staticmethod(recording_encode))
    params = GeneratorParams(points_per_side=16, pred_iou_thresh=0.0, stability_score_thresh=0.0,
                             crop_n_layers=crop_n_layers)
    report, counts = _compare(model, generator, synthetic_scene(480, 640, seed=3), params)
    _assert_parity(report)
    assert report.our_masks > 3 and len(stored) == counts["after_crop_edge"] > 3 * report.our_masks
    assert {t for _, _, t in stored} == {(-1.0, 0.0, 1.0)}  # exact at threshold ± offset too: stability comes later
    assert sum(c.nbytes for c, _, _ in stored) < 0.3 * sum(raw for _, raw, _ in stored)
