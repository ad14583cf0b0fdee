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
    from sam2serve.engines.onnx_engine import OnnxEngine

    reference = OnnxEngine(trt_engine_dir, providers=["CPUExecutionProvider"], warmup=False)
    tensorrt = TensorRTEngine(trt_engine_dir)
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


@pytest.mark.gpu
@needs_tensorrt_gpu
@pytest.mark.parametrize("batch", [1, 64])
def test_decoder_matches_onnx_runtime(engines, features, batch: int) -> None:
    tensorrt, reference = engines
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
def test_factored_decoder_plans_match_onnx_runtime(engines, features) -> None:
    """Without a mask input both engines run the factored decoder; decode_above makes the same survivors' masks
    and batches above the plan's profile run in chunks."""
    tensorrt, reference = engines
    assert tensorrt.factored is not None and tensorrt.can_skip_masks
    batch = MAX_BATCH + 5
    coords, labels = _prompts(batch, 3, seed=11)
    got = tensorrt.decode_all_tokens(features, coords, labels)
    want = reference.decode_all_tokens(features, coords, labels)
    for g, w in zip(got, want, strict=True):
        assert max_relative_error(g, w) < 1e-3
    threshold = float(np.median(want[1][:, 1:].max(axis=1)))
    above = tensorrt.decode_above(features, coords, labels, threshold)
    needed = (want[1][:, 1:] > threshold).any(axis=1)
    assert max_relative_error(above.low_res_logits[needed], want[0][needed, 1:]) < 1e-3
    assert not above.low_res_logits[~needed].any()
    assert tensorrt.factored.stats.masked_prompts >= needed.sum()


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
