"""Prompted segmentation against Meta's `SAM2ImagePredictor.predict`: single point, points with a background
point, a box, box + points, several boxes, mask refinement, multimask on and off — relative error ≤ 1e-4 on
logits and scores, identical mask choice.

Untrained weights give small logits (|logit| < 0.5): the predictor's ±32 clamp never bites and its dynamic
single-mask fallback always falls back. So the same cases also run on a *sharpened* copy of the decoder
(peaked attention, strong point embeddings, logits ×200): its logits pass the clamp and its single-mask token
is stable. Deliberate mistakes in our prompt preparation are shown to fail the comparison.

The real photo (../shared/images/truck.jpg, or SAM2SERVE_TEST_IMAGES) is skipped when absent; the synthetic
scene always runs.
"""

from __future__ import annotations

import copy
import os
import shutil

import numpy as np
import pytest

from conftest import SEED, TINY, needs_export_tools, shared_image
from sam2serve.images import read_rgb, synthetic_scene

pytestmark = needs_export_tools
LOGIT_GAIN = 200.0  # untrained logits reach ≈ 0.45; ×200 puts many beyond the ±32 clamp


def _sharpen(model):
    import torch

    sharp = copy.deepcopy(model)
    decoder = sharp.sam_mask_decoder
    with torch.no_grad():
        for module in decoder.transformer.modules():  # attention logits ×16: peaked, prompt-specific attention
            if hasattr(module, "q_proj") and hasattr(module, "k_proj"):
                module.q_proj.weight.mul_(4.0)
                module.k_proj.weight.mul_(4.0)
        for embedding in sharp.sam_prompt_encoder.point_embeddings:  # labels 0..3 matter more
            embedding.weight.mul_(4.0)
        for mlp in decoder.output_hypernetworks_mlps:  # mask logits scale with the hypernetworks' output
            mlp.layers[-1].weight.mul_(LOGIT_GAIN)
            mlp.layers[-1].bias.mul_(LOGIT_GAIN)
    return sharp.eval()


@pytest.fixture(scope="module")
def sharpened(tiny_export, tmp_path_factory):
    """(engine, torch model): the untrained export's encoder, and a decoder exported from the sharpened model."""
    from sam2serve.engines.manifest import Weights, write_manifest
    from sam2serve.engines.onnx_engine import OnnxEngine
    from sam2serve_export.build import make_manifest
    from sam2serve_export.models import get_model_spec
    from sam2serve_export.onnx_export import export_decoder

    engine_dir, model = tiny_export
    model = _sharpen(model)
    out = tmp_path_factory.mktemp("sharpened")
    try:
        os.link(engine_dir / "encoder.onnx", out / "encoder.onnx")
    except OSError:
        shutil.copy(engine_dir / "encoder.onnx", out / "encoder.onnx")
    export_decoder(model, out / "decoder.onnx")
    weights = Weights("untrained", seed=SEED, source="sharpened for tests")
    write_manifest(out, make_manifest(get_model_spec(TINY), model, weights, out, 18))
    return OnnxEngine(out, providers=["CPUExecutionProvider"], warmup=False), model


def _predictor(model, image):
    import torch
    from sam2.sam2_image_predictor import SAM2ImagePredictor

    predictor = SAM2ImagePredictor(model)
    with torch.no_grad():
        predictor.set_image(image)
    return predictor


@pytest.fixture(scope="module")
def untrained_bench(tiny_export, tiny_engine):
    from sam2serve_export.prompt_parity import PromptParity

    image = synthetic_scene()
    return PromptParity(_predictor(tiny_export[1], image), tiny_engine, image)


@pytest.fixture(scope="module")
def sharpened_bench(sharpened):
    from sam2serve_export.prompt_parity import PromptParity

    image = synthetic_scene()
    return PromptParity(_predictor(sharpened[1], image), sharpened[0], image)


def _bench(which: str, model, engine, bench):
    from sam2serve_export.prompt_parity import PromptParity

    if which == "synthetic":
        return bench
    image = read_rgb(shared_image(which))
    return PromptParity(_predictor(model, image), engine, image)


@pytest.mark.parametrize("which", ["synthetic", "truck.jpg"])
def test_untrained_engines_match_metas_predictor(tiny_export, tiny_engine, untrained_bench, which):
    from sam2serve_export.verify import check_parity, format_table

    rows = _bench(which, tiny_export[1], tiny_engine, untrained_bench).rows(which)
    print(format_table(rows))
    assert len(rows) == 6 * 2 * 3  # every case, multimask on and off, logits + scores + full-res masks
    check_parity(rows)


@pytest.mark.parametrize("which", ["synthetic", "truck.jpg"])
def test_sharpened_decoder_matches_metas_predictor(sharpened, sharpened_bench, which):
    from sam2serve_export.verify import check_parity, format_table

    rows = _bench(which, sharpened[1], sharpened[0], sharpened_bench).rows(f"{which} sharpened")
    print(format_table(rows))
    check_parity(rows)


def test_the_comparison_sees_the_clamp_and_both_single_mask_branches(untrained_bench, sharpened_bench):
    """What makes the sharpened run worth having: logits beyond the clamp, and a single-mask token that SAM 2
    keeps (stable) where the untrained one is always replaced by the best multimask token."""
    from sam2serve_export.prompt_parity import CASES, meta_predict

    for bench, stable_token_kept in ((untrained_bench, False), (sharpened_bench, True)):
        multi = meta_predict(bench.predictor, CASES[2], True, None)
        single = meta_predict(bench.predictor, CASES[2], False, None)
        replaced = bool(np.isclose(single.scores[0, 0], multi.scores[0]).any())
        assert replaced != stable_token_kept
        if stable_token_kept:
            assert np.abs(multi.low_res).max() == 32.0  # clamped: the unclamped logits go beyond


# Not among them: box corners after the clicks instead of before. The decoder's attention is equivariant to
# the order of the prompt tokens (they carry their position in their embedding), so that order cannot matter.
@pytest.mark.parametrize("mistake", ["box labels swapped", "mask input not clamped", "mask input ignored",
                                     "no single-mask fallback", "coordinates not scaled"])
def test_mistakes_in_prompt_preparation_fail_the_comparison(untrained_bench, sharpened_bench, mistake, monkeypatch):
    """Each plausible slip in `sam2serve.prompts` is caught by the parity check (so a pass means something)."""
    from sam2serve.engines import base, mask_selection
    from sam2serve.prompts import prepare, segmenter
    from sam2serve_export.errors import ParityError
    from sam2serve_export.prompt_parity import CASES
    from sam2serve_export.verify import check_parity

    case = {"box labels swapped": CASES[2], "mask input not clamped": CASES[5], "mask input ignored": CASES[5],
            "no single-mask fallback": CASES[0], "coordinates not scaled": CASES[0]}[mistake]
    bench = untrained_bench if mistake == "no single-mask fallback" else sharpened_bench  # untrained: always falls back
    if mistake == "box labels swapped":
        monkeypatch.setattr(prepare, "BOX_CORNER_LABELS", (3.0, 2.0))
    elif mistake == "mask input not clamped":
        monkeypatch.setattr(segmenter, "LOW_RES_CLAMP", np.inf)
        monkeypatch.setattr(prepare, "LOW_RES_CLAMP", np.inf)
    elif mistake == "mask input ignored":
        monkeypatch.setattr(segmenter, "mask_input", lambda logits, rows: None)
    elif mistake == "no single-mask fallback":
        monkeypatch.setattr(base, "select_tokens", lambda masks, iou, multimask, manifest: (
            mask_selection.select_multimask(masks, iou) if multimask else (masks[:, :1], iou[:, :1])))
    elif mistake == "coordinates not scaled":
        monkeypatch.setattr(prepare, "to_model_coords", lambda xy, hw, size: np.asarray(xy, np.float32))
    with pytest.raises(ParityError):
        check_parity(bench.rows(mistake, (case,)))
