"""TensorRT backend: clear errors without the `trt` extra; on a GPU, plans that agree with ORT on CPU."""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from sam2serve.engines.manifest import ManifestError
from sam2serve.engines.trt_engine import (
    TRT_MANIFEST_NAME,
    GpuInfo,
    TensorRTEngine,
    current_gpu,
    gpu_from_nvidia_smi_line,
    plan_key_for,
    shared_max_batch,
)
from sam2serve_export.errors import MissingDependencyError
from sam2serve_export.trt_build import build_trt_engines

MAX_BATCH = 128
MAX_POINTS = 4


def _tensorrt_gpu_available() -> bool:
    if importlib.util.find_spec("tensorrt") is None:
        return False
    try:
        current_gpu()
    except ManifestError:
        return False
    return True


needs_tensorrt_gpu = pytest.mark.skipif(
    not _tensorrt_gpu_available(), reason="needs an NVIDIA GPU and the tensorrt package"
)


def test_build_without_tensorrt_names_the_extra(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(MissingDependencyError, match=r"sam2serve\[trt\]"):
        build_trt_engines(tmp_path)


def test_engine_without_tensorrt_names_the_package(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(ManifestError, match="tensorrt"):
        TensorRTEngine(tmp_path)


def test_engine_without_cuda_python_names_it(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", types.ModuleType("tensorrt"))
    for name in ("cuda", "cuda.bindings", "cuda.bindings.runtime", "cuda.cudart"):
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(ManifestError, match="cuda-python"):
        TensorRTEngine(tmp_path)


def test_plan_key_names_gpu_capability_and_tensorrt_version() -> None:
    gpu = GpuInfo("NVIDIA H100 80GB HBM3", (9, 0))
    assert plan_key_for(gpu, "10.8.0.43") == "nvidia-h100-80gb-hbm3_sm90_trt10.8.0"


def test_gpu_from_nvidia_smi_line() -> None:
    line = "NVIDIA GeForce RTX 4090, 8.9\n"
    assert gpu_from_nvidia_smi_line(line) == GpuInfo("NVIDIA GeForce RTX 4090", (8, 9))
    with pytest.raises(ManifestError):
        gpu_from_nvidia_smi_line("No devices were found")


# --- on an NVIDIA GPU with tensorrt installed -------------------------------------------------------------

def max_relative_error(actual: np.ndarray, expected: np.ndarray) -> float:
    """Largest absolute difference relative to the reference's largest magnitude (elementwise ratios
    blow up on values near zero)."""
    assert actual.shape == expected.shape
    scale = max(float(np.max(np.abs(expected))), 1e-12)
    return float(np.max(np.abs(actual.astype(np.float64) - expected))) / scale


@pytest.fixture(scope="module")
def trt_engine_dir(tiny_engine_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the session's tiny engine directory (left untouched) with fp32 plans built in it."""
    directory = tmp_path_factory.mktemp("trt") / "engine"
    shutil.copytree(tiny_engine_dir, directory)
    build_trt_engines(directory, max_batch=MAX_BATCH, opt_batch=64, max_points=MAX_POINTS, progress=False)
    return directory


@pytest.fixture(scope="module")
def engines(trt_engine_dir: Path):
    """TensorRT and ONNX Runtime on CPU, both with the factored decoder."""
    from sam2serve.engines.onnx_engine import OnnxEngine

    reference = OnnxEngine(trt_engine_dir, providers=["CPUExecutionProvider"], warmup=False)
    tensorrt = TensorRTEngine(trt_engine_dir)
    yield tensorrt, reference
    tensorrt.close()
    reference.close()


@pytest.fixture(scope="module")
def whole_decoders(trt_engine_dir: Path):
    """TensorRT and ONNX Runtime on CPU, every prompt through the whole decoder (plan / decoder.onnx)."""
    from sam2serve.engines.onnx_engine import OnnxEngine

    reference = OnnxEngine(trt_engine_dir, providers=["CPUExecutionProvider"], warmup=False, factored=False)
    tensorrt = TensorRTEngine(trt_engine_dir, warmup=False, factored=False)
    yield tensorrt, reference
    tensorrt.close()
    reference.close()


@pytest.fixture(scope="module")
def features(engines):
    _, reference = engines
    image = np.random.default_rng(0).standard_normal((1, 3, 1024, 1024), dtype=np.float32)
    return reference.encode(image)


def _prompts(batch: int, points: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    coords = rng.uniform(0, 1024, (batch, points, 2)).astype(np.float32)
    labels = rng.integers(0, 2, (batch, points)).astype(np.float32)
    labels[:, 0] = 1.0
    return coords, labels


@pytest.mark.gpu
@needs_tensorrt_gpu
def test_build_writes_plans_and_manifest(trt_engine_dir: Path) -> None:
    import tensorrt

    from sam2serve.engines.manifest import read_manifest, sha256_file

    key = plan_key_for(current_gpu(), tensorrt.__version__)
    plan_dir = trt_engine_dir / "trt" / key
    info = json.loads((plan_dir / TRT_MANIFEST_NAME).read_text())
    manifest = read_manifest(trt_engine_dir)
    assert info["key"] == key and info["tensorrt"] == tensorrt.__version__ and info["fp16"] is False
    rank = info["profile"]["rank"]  # the prompt head's state: 2 · 8 heads · (7 tokens + points)
    assert info["profile"] == {"batch": [1, 64, MAX_BATCH], "points": [1, 1, MAX_POINTS], "rank": rank}
    assert rank == [16 * 8, 16 * 8, 16 * (7 + MAX_POINTS)]
    for role in ("encoder", "decoder", "decoder_context", "prompt_head", "mask_head"):
        plan = info["plans"][role]
        assert plan["sha256"] == sha256_file(plan_dir / plan["file"])
        assert plan["onnx_sha256"] == manifest.engine_file(role).sha256


@pytest.mark.gpu
@needs_tensorrt_gpu
def test_encoder_matches_onnx_runtime(engines) -> None:
    tensorrt, reference = engines
    image = np.random.default_rng(1).standard_normal((1, 3, 1024, 1024), dtype=np.float32)
    for name, got, want in zip(("image_embed", "high_res_feats_0", "high_res_feats_1"),
                               vars(tensorrt.encode(image)).values(), vars(reference.encode(image)).values(),
                               strict=True):
        assert max_relative_error(got, want) < 1e-3, name


def _assert_same_clear_choices(got_iou: np.ndarray, want_iou: np.ndarray, tolerance: float) -> None:
    """The best multimask token is the same wherever the reference's best leads its runner-up by more than the
    backends may differ (untrained weights give near-ties, where either choice is within float rounding)."""
    ranked = np.sort(want_iou[:, 1:], axis=1)
    clear = ranked[:, -1] - ranked[:, -2] > 2 * tolerance * np.abs(want_iou).max()
    assert clear.any()
    np.testing.assert_array_equal(got_iou[clear, 1:].argmax(axis=1), want_iou[clear, 1:].argmax(axis=1))


@pytest.mark.gpu
@needs_tensorrt_gpu
@pytest.mark.parametrize("batch", [1, 64])
def test_decoder_plan_matches_onnx_runtime(whole_decoders, features, batch: int) -> None:
    tensorrt, reference = whole_decoders
    assert tensorrt.factored is None and reference.factored is None
    coords, labels = _prompts(batch, 2, seed=batch)
    got_masks, got_iou = tensorrt.decode_all_tokens(features, coords, labels)
    want_masks, want_iou = reference.decode_all_tokens(features, coords, labels)
    assert max_relative_error(got_masks, want_masks) < 1e-3
    assert max_relative_error(got_iou, want_iou) < 1e-3
    assert tensorrt.decode(features, coords, labels).low_res_logits.shape == (batch, 3, 256, 256)
    single = tensorrt.decode(features, coords, labels, multimask=False)
    assert single.low_res_logits.shape == (batch, 1, 256, 256) and single.iou_predictions.shape == (batch, 1)


@pytest.mark.gpu
@needs_tensorrt_gpu
@pytest.mark.parametrize(("batch", "points", "box"), [(1, 1, False), (64, 3, False), (16, 3, True),
                                                      (MAX_BATCH + 5, 1, False)])
def test_factored_plans_match_onnx_runtime(engines, features, batch: int, points: int, box: bool) -> None:
    """Without a mask input both engines run the factored decoder (batches above the plans' profile in chunks):
    the same logits and IoU of every token, and the same clear token choices."""
    tensorrt, reference = engines
    assert tensorrt.factored is not None and tensorrt.can_skip_masks and reference.factored is not None
    coords, labels = _prompts(batch, points, seed=100 + batch)
    if box:  # a box is its two corners, labelled 2 and 3, placed first
        corners = np.sort(coords[:, :2], axis=1)
        coords = np.concatenate([corners, coords[:, 2:]], axis=1)
        labels = np.concatenate([np.tile([2.0, 3.0], (batch, 1)), labels[:, 2:]], axis=1).astype(np.float32)
    contexts = tensorrt.factored.stats.contexts
    got_masks, got_iou = tensorrt.decode_all_tokens(features, coords, labels)
    want_masks, want_iou = reference.decode_all_tokens(features, coords, labels)
    assert tensorrt.factored.stats.contexts <= contexts + 1  # one context per image, kept across calls
    assert max_relative_error(got_masks, want_masks) < 1e-3
    assert max_relative_error(got_iou, want_iou) < 1e-3
    if batch > 1:
        _assert_same_clear_choices(got_iou, want_iou, 1e-3)


@pytest.mark.gpu
@needs_tensorrt_gpu
def test_factored_plans_make_masks_only_above_the_threshold(engines, features) -> None:
    tensorrt, reference = engines
    batch = MAX_BATCH + 5
    coords, labels = _prompts(batch, 1, seed=11)
    want_masks, want_iou = reference.decode_all_tokens(features, coords, labels)
    best = np.sort(want_iou[:, 1:].max(axis=1))
    # a threshold in the widest gap near the median, so that float differences cannot move a prompt across it
    middle = slice(batch // 4, 3 * batch // 4)
    gap = int(np.argmax(np.diff(best[middle]))) + middle.start
    threshold = float(best[gap] + best[gap + 1]) / 2
    needed = (want_iou[:, 1:] > threshold).any(axis=1)
    before = tensorrt.factored.stats.masked_prompts
    above = tensorrt.decode_above(features, coords, labels, threshold)
    assert tensorrt.factored.stats.masked_prompts - before == needed.sum() > 0
    assert max_relative_error(above.iou_predictions, want_iou[:, 1:]) < 1e-3
    assert max_relative_error(above.low_res_logits[needed], want_masks[needed, 1:]) < 1e-3
    assert not above.low_res_logits[~needed].any()


@pytest.mark.gpu
@needs_tensorrt_gpu
def test_plans_built_before_the_factored_decoder_still_serve(trt_engine_dir: Path, features, caplog) -> None:
    plan_dir = next((trt_engine_dir / "trt").iterdir())
    path = plan_dir / TRT_MANIFEST_NAME
    original = path.read_text()
    info = json.loads(original)
    for role in ("decoder_context", "prompt_head", "mask_head"):
        del info["plans"][role]
    path.write_text(json.dumps(info))
    try:
        with caplog.at_level("INFO"):
            older = TensorRTEngine(trt_engine_dir, warmup=False)
    finally:
        path.write_text(original)
    try:
        assert older.factored is None and not older.can_skip_masks
        assert "rebuild the TensorRT plans for the factored one" in caplog.text
        coords, labels = _prompts(4, 1, seed=5)
        out = older.decode(features, coords, labels)
        above = older.decode_above(features, coords, labels, 1.0)  # without the heads every prompt gets masks
        np.testing.assert_array_equal(above.low_res_logits, out.low_res_logits)
    finally:
        older.close()


@pytest.mark.gpu
@needs_tensorrt_gpu
def test_decoder_splits_batches_above_the_profile_with_mask_input(engines, features) -> None:
    tensorrt, reference = engines
    batch = MAX_BATCH + 3
    coords, labels = _prompts(batch, 1, seed=7)
    mask_input = np.random.default_rng(7).standard_normal((batch, 1, 256, 256), dtype=np.float32) * 4
    got_masks, got_iou = tensorrt.decode_all_tokens(features, coords, labels, mask_input)
    want_masks, want_iou = reference.decode_all_tokens(features, coords, labels, mask_input)
    assert max_relative_error(got_masks, want_masks) < 1e-3
    assert max_relative_error(got_iou, want_iou) < 1e-3


@pytest.mark.gpu
@needs_tensorrt_gpu
def test_plans_from_an_older_export_are_refused(trt_engine_dir: Path) -> None:
    plan_dir = next((trt_engine_dir / "trt").iterdir())
    path = plan_dir / TRT_MANIFEST_NAME
    original = path.read_text()
    info = json.loads(original)
    info["plans"]["decoder"]["onnx_sha256"] = "0" * 64
    path.write_text(json.dumps(info))
    try:
        with pytest.raises(ManifestError, match="rebuild the TensorRT plans"):
            TensorRTEngine(trt_engine_dir, warmup=False)
    finally:
        path.write_text(original)


def test_the_factored_decoders_batch_is_bounded_by_every_plan_it_runs():
    """Before, the batch came from the prompt head's profile alone: a mask head or decoder plan built with a
    smaller profile got batches beyond it (a TensorRT shape error at run time)."""
    shapes = {("prompt_head", "point_coords"): (64, 8, 2), ("prompt_head", "point_labels"): (64, 8),
              ("mask_head", "mask_queries"): (16, 4, 256), ("mask_head", "coeffs"): (16, 48, 4096),
              ("decoder", "point_coords"): (32, 8, 2)}
    assert shared_max_batch(shapes) == 16
    assert shared_max_batch({**shapes, ("decoder", "point_coords"): (8, 8, 2)}) == 8
    with pytest.raises(ValueError):
        shared_max_batch({})
