"""Exported engines compute what the torch model (and Meta's predictor) computes."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import SEED, TINY, needs_export_tools, shared_image
from sam2serve.engines.manifest import read_manifest
from sam2serve.images import read_rgb, synthetic_scene

pytestmark = needs_export_tools


def test_manifest_describes_the_untrained_export(tiny_engine_dir):
    m = read_manifest(tiny_engine_dir)
    assert m.model == TINY and m.config == "configs/sam2.1/sam2.1_hiera_t.yaml"
    assert m.weights.origin == "untrained" and m.weights.seed == SEED and not m.weights.trained
    assert m.opset == 18 and m.image_size == 1024 and m.low_res_mask_size == 256 and m.mask_tokens == 4
    enc, dec = m.engines["encoder"], m.engines["decoder"]
    assert [(t.name, t.shape) for t in enc.outputs] == [
        ("image_embed", [1, 256, 64, 64]), ("high_res_feats_0", [1, 32, 256, 256]),
        ("high_res_feats_1", [1, 64, 128, 128])]
    shapes = {t.name: t.shape for t in dec.inputs}
    assert isinstance(shapes["point_coords"][0], str) and isinstance(shapes["point_coords"][1], str)
    assert [t.name for t in dec.outputs] == ["masks", "iou_predictions"]
    assert all(v != "absent" for k, v in m.tools.items() if k in ("torch", "sam2", "onnx", "onnxruntime"))
    assert json.loads((tiny_engine_dir / "manifest.json").read_text())["weights"]["origin"] == "untrained"


def test_parity_with_torch_and_metas_predictor_on_a_synthetic_image(tiny_model, tiny_engine_dir):
    from sam2serve_export.verify import DEFAULT_TOLERANCE, check_parity, verify_engines

    # The prompt data plane's rows on this image are tests/test_prompt_parity.py's: not computed twice here.
    rows = verify_engines(tiny_model, tiny_engine_dir, synthetic_scene(), "synthetic", prompts=False)
    cases = {(r.graph, r.case) for r in rows}
    for batch in (1, 257):
        assert ("factored", f"random B={batch} P=1") in cases
    assert ("factored", "random B=64 P=3") in cases and ("factored", "random B=16 P=2 +box") in cases
    assert ("decoder", "random B=8 +mask") in cases
    assert any("single (dynamic)" in case for _, case in cases) and any("box+point" in case for _, case in cases)
    assert all(r.relative == 0.0 for r in rows if r.output == "token choice")
    assert max(r.relative for r in rows) < DEFAULT_TOLERANCE
    assert all(r.sign_flips < 1e-4 for r in rows if r.sign_flips is not None)
    check_parity(rows)


def test_parity_on_a_real_photo(tiny_model, tiny_engine_dir):
    from sam2serve_export.verify import check_parity, verify_engines

    path = shared_image("truck.jpg")
    check_parity(verify_engines(tiny_model, tiny_engine_dir, read_rgb(path), path.name, cases=((8, 1, False),)))


def test_check_parity_fails_loudly_above_tolerance():
    from sam2serve_export.errors import ParityError
    from sam2serve_export.verify import ParityRow, check_parity

    rows = [ParityRow("decoder", "random B=1", "masks", 0.5, 2e-4)]
    with pytest.raises(ParityError, match="decoder random B=1 masks"):
        check_parity(rows)


def test_single_mask_selection_matches_metas_decoder(tiny_model):
    import torch

    from sam2serve.engines.mask_selection import select_single_mask

    decoder = tiny_model.sam_mask_decoder
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(32, 4, 256, 256, generator=g)
    logits[:16, 0] = torch.where(logits[:16, 0] > 0, 9.0, -9.0)  # half the batch is stable
    iou = torch.rand(32, 4, generator=g)
    ref_masks, ref_iou = decoder._dynamic_multimask_via_stability(logits, iou)
    masks, ious = select_single_mask(logits.numpy(), iou.numpy(), True,
                                     decoder.dynamic_multimask_stability_delta,
                                     decoder.dynamic_multimask_stability_thresh)
    np.testing.assert_array_equal(masks, ref_masks.numpy())
    np.testing.assert_array_equal(ious, ref_iou.numpy())


def test_factored_decoder_equals_the_whole_decoder(tiny_model, tiny_engine_dir):
    """decoder_context + prompt_head + mask_head compute what decoder.onnx computes; decode_above makes masks only
    for prompts with a multimask IoU above the threshold, and those masks are the decoder's."""
    from sam2serve.engines.base import ImageFeatures
    from sam2serve.engines.onnx_engine import OnnxEngine
    from sam2serve_export.wrappers import example_decoder_inputs

    engine = OnnxEngine(tiny_engine_dir, providers=["CPUExecutionProvider"], warmup=False)
    whole = OnnxEngine(tiny_engine_dir, providers=["CPUExecutionProvider"], warmup=False, factored=False)
    assert engine.can_skip_masks and engine.factored is not None and whole.factored is None
    args = example_decoder_inputs(tiny_model, 16, points=1, seed=11)
    features = ImageFeatures(*(a.numpy() for a in args[:3]))
    coords, labels = args[3].numpy(), args[4].numpy()
    whole_masks, whole_iou = whole.decode_all_tokens(features, coords, labels)
    masks, iou = engine.decode_all_tokens(features, coords, labels)
    np.testing.assert_allclose(iou, whole_iou, atol=1e-6)
    np.testing.assert_allclose(masks, whole_masks, atol=1e-4 * np.abs(whole_masks).max())
    threshold = float(np.median(whole_iou[:, 1:].max(axis=1)))  # about half the prompts pass
    stats = engine.factored.stats.as_dict()
    split = engine.decode_above(features, coords, labels, threshold)
    np.testing.assert_allclose(split.iou_predictions, whole_iou[:, 1:], atol=1e-6)
    needed = (whole_iou[:, 1:] > threshold).any(axis=1)
    assert 0 < needed.sum() < len(needed)
    np.testing.assert_allclose(split.low_res_logits[needed], whole_masks[needed, 1:],
                               atol=1e-4 * np.abs(whole_masks).max())
    assert not split.low_res_logits[~needed].any()
    after = engine.factored.stats.as_dict()
    assert after["masked_prompts"] - stats["masked_prompts"] == needed.sum()
    assert after["prompts"] - stats["prompts"] == len(needed) and after["contexts"] == stats["contexts"]
