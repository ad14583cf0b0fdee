"""Optional engine variants, never the default: int8 dynamically quantised encoder (CPU), fp16 graphs (GPU)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx

from sam2serve.engines.manifest import EngineFile, describe_engine_file
from sam2serve.engines.onnx_engine import OnnxEngine

from .onnx_export import onnx_signature

# Norms, softmax and their reductions stay fp32: fp16 LayerNorm overflows in SAM's decoders.
FP16_KEEP_FP32 = ["LayerNormalization", "ReduceMean", "Pow", "Sqrt", "Softmax", "Div", "Erf"]


def build_int8_encoder(directory: Path) -> EngineFile:
    """Dynamic int8 quantisation of the encoder's MatMuls (Conv too was slower and drifted more).

    Weights are unsigned (U8U8 kernels): with signed weights, ORT's U8S8 kernels on CPUs without VNNI
    (AVX2 only) saturate 16-bit intermediate sums, and image_embed drifted 34 % instead of 2.4 %. The
    variant may be built on one CPU and served on another, so it must not depend on VNNI."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    source, target = directory / "encoder.onnx", directory / "encoder_int8.onnx"
    quantize_dynamic(str(source), str(target), op_types_to_quantize=["MatMul"], weight_type=QuantType.QUInt8)
    return describe_engine_file(target, *onnx_signature(target), precision="int8-dynamic")


def build_fp16(directory: Path, role: str) -> EngineFile:
    """fp16 weights and math with fp32 inputs/outputs; for GPU providers (CPU runs it slowly)."""
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    source, target = directory / f"{role}.onnx", directory / f"{role}_fp16.onnx"
    converted = convert_float_to_float16(
        onnx.load(str(source)), keep_io_types=True, op_block_list=DEFAULT_OP_BLOCK_LIST + FP16_KEEP_FP32,
    )
    onnx.save(converted, str(target))
    return describe_engine_file(target, *onnx_signature(target), precision="fp16")


def variant_mask_drift(directory: Path, variant: str, image: np.ndarray) -> dict[str, float]:
    """Effect of an encoder variant on what users see: embedding drift and mask agreement with fp32
    on a 8×8 grid of prompts over `image`."""
    from sam2serve.preprocess import to_model_input

    base = OnnxEngine(directory, providers=["CPUExecutionProvider"], warmup=False)
    other = OnnxEngine(directory, providers=["CPUExecutionProvider"], encoder_variant=variant, warmup=False)
    m = base.manifest
    x = to_model_input(image, m.image_size, m.pixel_mean, m.pixel_std)
    fa, fb = base.encode(x), other.encode(x)
    grid = (np.arange(8, dtype=np.float32) + 0.5) / 8 * m.image_size
    coords = np.stack(np.meshgrid(grid, grid), axis=-1).reshape(-1, 1, 2)
    labels = np.ones((len(coords), 1), np.float32)
    ma = base.decode(fa, coords, labels).low_res_logits > m.mask_threshold
    mb = base.decode(fb, coords, labels).low_res_logits > m.mask_threshold
    inter = np.logical_and(ma, mb).sum(axis=(-1, -2))
    union = np.logical_or(ma, mb).sum(axis=(-1, -2))
    iou = np.where(union > 0, inter / np.maximum(union, 1), 1.0)
    embed_drift = float(np.abs(fa.image_embed - fb.image_embed).max() / np.abs(fa.image_embed).max())
    return {
        "image_embed_relative": embed_drift,
        "mask_pixels_flipped": float(np.mean(ma != mb)),
        "mask_iou_mean": float(iou.mean()),
        "mask_iou_min": float(iou.min()),
    }
