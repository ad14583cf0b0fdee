"""The factored decoder at run time: per-image context caching, batching by memory, graphs that must fit
together, and engine directories exported before it (parity with torch is in test_export_parity)."""

from __future__ import annotations

import gc
import json
import shutil

import numpy as np
import pytest

from conftest import needs_export_tools
from sam2serve.engines.base import ImageFeatures
from sam2serve.engines.factored import (
    CPU_PROMPT_HEAD_BATCH,
    DEFAULT_DECODER_MEMORY,
    PROMPT_HEAD_BYTES_PER_PROMPT,
    batch_for_memory,
    check_factored_graphs,
)
from sam2serve.engines.manifest import ManifestError
from sam2serve.engines.onnx_engine import MAX_AUTO_HEAD_WORKERS, OnnxEngine, cpu_head_workers

pytestmark = needs_export_tools


def _features(seed: int) -> ImageFeatures:
    rng = np.random.default_rng(seed)
    return ImageFeatures(rng.standard_normal((1, 256, 64, 64), np.float32),
                         rng.standard_normal((1, 32, 256, 256), np.float32),
                         rng.standard_normal((1, 64, 128, 128), np.float32))


def _prompts(batch: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.uniform(0, 1024, (batch, 1, 2)).astype(np.float32), np.ones((batch, 1), np.float32)


@pytest.fixture(scope="module")
def engine(tiny_engine_dir):
    return OnnxEngine(tiny_engine_dir, providers=["CPUExecutionProvider"], warmup=False)


def test_context_is_computed_once_per_image_and_dropped_with_it(engine):
    stats = engine.factored.stats
    before = stats.contexts
    features = _features(0)
    coords, labels = _prompts(3, 1)
    first = engine.decode(features, coords, labels)
    second = engine.decode(features, coords, labels)
    assert stats.contexts == before + 1
    np.testing.assert_array_equal(first.low_res_logits, second.low_res_logits)
    cached = len(engine.factored._contexts)
    del features
    gc.collect()
    assert len(engine.factored._contexts) == cached - 1
    engine.decode(_features(0), coords, labels)
    assert stats.contexts == before + 2


def test_heads_batch_by_memory_with_the_same_results(tiny_engine_dir, engine):
    small = OnnxEngine(tiny_engine_dir, providers=["CPUExecutionProvider"], warmup=False,
                       decoder_memory_bytes=1)
    assert small.factored.prompt_batch == small.factored.mask_batch == 1
    features = _features(2)
    coords, labels = _prompts(5, 3)
    one_by_one = small.decode_all_tokens(features, coords, labels)
    batched = engine.decode_all_tokens(features, coords, labels)
    for a, b in zip(one_by_one, batched, strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5 * np.abs(b).max())
    assert batch_for_memory(10 << 20, 1 << 20) == 10 and batch_for_memory(1 << 40, 1) == 64


def test_prompt_head_batch_is_bounded_on_cpus_with_the_same_results(tiny_engine_dir, engine):
    """The CPU provider takes cache-sized prompt-head batches by default; an explicit bound wins; results do not
    depend on it."""
    by_memory = batch_for_memory(DEFAULT_DECODER_MEMORY // engine.factored.workers, PROMPT_HEAD_BYTES_PER_PROMPT)
    assert engine.factored.prompt_batch == min(CPU_PROMPT_HEAD_BATCH, by_memory)
    three = OnnxEngine(tiny_engine_dir, providers=["CPUExecutionProvider"], warmup=False, prompt_head_batch=3)
    assert three.factored.prompt_batch == 3
    features = _features(6)
    coords, labels = _prompts(7, 7)
    iou_three, state_three = three.factored.prompt_head(features, coords, labels)
    iou, state = engine.factored.prompt_head(features, coords, labels)
    np.testing.assert_allclose(iou_three, iou, rtol=0, atol=1e-5 * np.abs(iou).max())
    for name in state:
        np.testing.assert_allclose(state_three[name], state[name], rtol=0, atol=1e-5 * np.abs(state[name]).max())


def test_directory_exported_before_the_factored_decoder_still_serves(tiny_engine_dir, tmp_path, caplog):
    old = tmp_path / "engines"
    shutil.copytree(tiny_engine_dir, old)
    raw = json.loads((old / "manifest.json").read_text())
    for role in ("decoder_context", "prompt_head", "mask_head"):
        (old / raw["engines"].pop(role)["file"]).unlink()
    (old / "manifest.json").write_text(json.dumps(raw))
    with caplog.at_level("INFO"):
        engine = OnnxEngine(old, providers=["CPUExecutionProvider"], warmup=False)
    assert engine.factored is None and not engine.can_skip_masks
    assert "re-export" in caplog.text
    features = _features(4)
    coords, labels = _prompts(2, 5)
    out = engine.decode(features, coords, labels)
    assert out.low_res_logits.shape == (2, 3, 256, 256)
    above = engine.decode_above(features, coords, labels, 1.0)  # no IoU above 1: masks made all the same
    np.testing.assert_array_equal(above.low_res_logits, out.low_res_logits)
    np.testing.assert_array_equal(above.iou_predictions, out.iou_predictions)


def test_factored_graphs_that_do_not_fit_together_are_refused():
    ctx = ["a", "b"]
    prompt_in = ["a", "point_coords", "point_labels"]
    prompt_out = ["iou_predictions", "mask_queries", "coeffs", "inv_std", "mix"]
    mask_in = ["b", "mask_queries", "coeffs", "inv_std", "mix"]
    check_factored_graphs(ctx, prompt_in, prompt_out, mask_in, ["masks"])
    with pytest.raises(ManifestError, match="prompt_head inputs outside the context are"):
        check_factored_graphs(ctx, ["a", "c", "point_coords", "point_labels"], prompt_out, mask_in, ["masks"])
    with pytest.raises(ManifestError, match="mask_head inputs outside the context"):
        check_factored_graphs(ctx, prompt_in, prompt_out, ["b", "coeffs", "inv_std", "mix"], ["masks"])
    with pytest.raises(ManifestError, match="prompt_head outputs"):
        check_factored_graphs(ctx, prompt_in, prompt_out[:-1], mask_in, ["masks"])


def test_cpu_heads_run_one_batch_per_thread_sharing_the_memory_budget(tiny_engine_dir, engine):
    """By default the CPU provider runs as many one-thread head batches at once as it has intra-op threads (capped);
    the workers split the decoder memory budget; results do not depend on the number of workers."""
    assert cpu_head_workers(3) == 3 and cpu_head_workers(64) == MAX_AUTO_HEAD_WORKERS and cpu_head_workers(1) == 1
    assert engine.factored.workers == cpu_head_workers(0)
    two = OnnxEngine(tiny_engine_dir, providers=["CPUExecutionProvider"], warmup=False, head_workers=2,
                     decoder_memory_bytes=4 * PROMPT_HEAD_BYTES_PER_PROMPT)
    assert two.factored.workers == 2 and two.factored.prompt_batch == 2
    # a lone batch (a click) runs on the sessions that use every intra-op thread, batches side by side on their own
    assert two.factored._side_prompt is not two.factored._run_prompt
    one = OnnxEngine(tiny_engine_dir, providers=["CPUExecutionProvider"], warmup=False, head_workers=1)
    assert one.factored.workers == 1 and one.factored._pool is None
    features = _features(8)
    for count in (9, 1):
        coords, labels = _prompts(count, 9)
        for a, b in zip(two.decode_all_tokens(features, coords, labels),
                        one.decode_all_tokens(features, coords, labels), strict=True):
            np.testing.assert_allclose(a, b, rtol=0, atol=1e-5 * np.abs(b).max())


def test_mask_head_takes_any_rows_of_the_prompt_state(tiny_engine_dir):
    """Consecutive rows are sliced, others indexed: each prompt gets its own masks either way, in every batch."""
    small = OnnxEngine(tiny_engine_dir, providers=["CPUExecutionProvider"], warmup=False, head_workers=1,
                       decoder_memory_bytes=2 * (60 << 20))  # mask batches of 2
    assert small.factored.mask_batch == 2
    features = _features(4)
    coords, labels = _prompts(6, 5)
    _, state = small.factored.prompt_head(features, coords, labels)
    every = small.factored.mask_head(features, state, np.arange(6))
    for rows in ([1, 2, 3, 4, 5], [0, 2, 5], [5, 3], [4]):
        got = small.factored.mask_head(features, state, np.asarray(rows))
        np.testing.assert_allclose(got, every[rows], rtol=0, atol=1e-5 * np.abs(every).max(), err_msg=str(rows))
    assert small.factored.mask_head(features, state, np.arange(0)).shape[0] == 0
