"""Engines: open an exported engine directory behind one interface (`Engine`)."""

from .base import DecodedMasks, Engine, ImageFeatures
from .manifest import Manifest, ManifestError

__all__ = ["DecodedMasks", "Engine", "ImageFeatures", "Manifest", "ManifestError", "open_engine"]


def open_engine(directory: str, backend: str = "onnx", **options: object) -> Engine:
    """`backend` "onnx" (ONNX Runtime, any provider) or "tensorrt" (.plan files built by `export trt`)."""
    if backend == "onnx":
        from .onnx_engine import OnnxEngine

        return OnnxEngine(directory, **options)  # type: ignore[arg-type]
    if backend == "tensorrt":
        from .trt_engine import TensorRTEngine

        return TensorRTEngine(directory, **options)  # type: ignore[arg-type]
    raise ValueError(f"unknown engine backend {backend!r}: choose 'onnx' or 'tensorrt'")
