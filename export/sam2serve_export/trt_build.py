"""Build TensorRT plans from an engine directory's ONNX graphs, for the GPU this runs on.

Plans are not portable across GPU models or TensorRT versions, so each build goes to
`<engine dir>/trt/<key>/` with a `trt_manifest.json` that the TensorRT backend checks before serving.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import time
from pathlib import Path
from types import ModuleType
from typing import Any

from tqdm import tqdm

from sam2serve.engines.manifest import ManifestError, read_manifest, sha256_file, verify_engine_files
from sam2serve.engines.trt_engine import (
    INSTALL_HINT,
    TRT_DIR,
    TRT_FORMAT_VERSION,
    TRT_MANIFEST_NAME,
    current_gpu,
    plan_key_for,
    plan_roles,
)

from .errors import ExportError, MissingDependencyError

log = logging.getLogger(__name__)

# Which dynamic ONNX axes are which, per input (None: a fixed axis). "rank" is the prompt head's per-prompt state
# size (2 · heads · tokens), which grows with the points per prompt.
DYNAMIC_AXES: dict[str, tuple[str | None, ...]] = {
    "point_coords": ("batch", "points", None),
    "point_labels": ("batch", "points"),
    "mask_input": ("batch", None, None, None),  # tied to the prompts' batch
    "mask_queries": ("batch", None, None),
    "coeffs": ("batch", "rank", None),
    "inv_std": ("batch", None, None),
    "mix": ("batch", "rank", None),
}


def _import_tensorrt() -> ModuleType:
    try:
        import tensorrt
    except ImportError:
        raise MissingDependencyError(
            f"building TensorRT plans needs the `tensorrt` package, which is not installed: {INSTALL_HINT} "
            "(plans only run on the GPU model they were built on, so build them where you serve)"
        ) from None
    if int(tensorrt.__version__.split(".")[0]) < 10:
        raise MissingDependencyError(
            f"TensorRT {tensorrt.__version__} is too old (needs ≥ 10): {INSTALL_HINT}"
        )
    return tensorrt


def _collecting_logger(trt: ModuleType) -> Any:
    """A TensorRT logger that forwards to `logging` and keeps error messages for the exception text."""
    errors = (trt.ILogger.Severity.INTERNAL_ERROR, trt.ILogger.Severity.ERROR)
    levels = {
        trt.ILogger.Severity.WARNING: logging.WARNING,
        trt.ILogger.Severity.INFO: logging.DEBUG,
        trt.ILogger.Severity.VERBOSE: logging.DEBUG,
    }

    class CollectingLogger(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, severity: Any, msg: str) -> None:
            if severity in errors:
                self.errors.append(msg)
                log.error("TensorRT: %s", msg)
            else:
                log.log(levels.get(severity, logging.DEBUG), "TensorRT: %s", msg)

    return CollectingLogger()


def _parse_onnx(trt: ModuleType, builder: Any, logger: Any, onnx_path: Path) -> tuple[Any, Any]:
    """(network, parser); the parser owns the weights, so it must live as long as the network."""
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        problems = [str(parser.get_error(i)) for i in range(parser.num_errors)] or logger.errors
        text = "\n  ".join(problems) or "(no error text)"
        hint = ""
        if any(op in text for op in ("OneHot", "Tile")):
            hint = ("\nOneHot/Tile nodes whose outputs feed shapes are a known trap of SAM decoder exports: "
                    "TensorRT needs such shape tensors to be computable at build time.")
        raise ExportError(
            f"TensorRT {trt.__version__}'s ONNX parser rejected {onnx_path}:\n  {text}{hint}"
        )
    return network, parser


def _is_normalisation_part(trt: ModuleType, layer: Any) -> bool:
    """INormalizationLayer, or a piece of a norm decomposed into Reduce/Pow/Sqrt/Div layers."""
    kind = layer.type
    if kind == trt.LayerType.NORMALIZATION:
        return True
    if kind == trt.LayerType.REDUCE:
        layer.__class__ = trt.IReduceLayer  # ILayer → its subclass, to read `op` (as Polygraphy does)
        return layer.op in (trt.ReduceOperation.AVG, trt.ReduceOperation.SUM)
    if kind == trt.LayerType.ELEMENTWISE:
        layer.__class__ = trt.IElementWiseLayer
        return layer.op in (trt.ElementWiseOperation.POW, trt.ElementWiseOperation.DIV)
    if kind == trt.LayerType.UNARY:
        layer.__class__ = trt.IUnaryLayer
        return layer.op == trt.UnaryOperation.SQRT
    return False


def keep_normalisation_in_fp32(trt: ModuleType, network: Any) -> int:
    """Pin normalisation layers to fp32 (fp16 LayerNorm overflows in SAM decoders); returns how many."""
    floating = (trt.float32, trt.float16)
    pinned = 0
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        tensors = [layer.get_input(j) for j in range(layer.num_inputs)]
        tensors += [layer.get_output(j) for j in range(layer.num_outputs)]
        # Shape arithmetic (int Reduce/Div on shape tensors) cannot take a float precision.
        if any(t is not None and t.dtype not in floating for t in tensors):
            continue
        if not _is_normalisation_part(trt, layer):
            continue
        layer.precision = trt.float32
        for j in range(layer.num_outputs):
            layer.set_output_type(j, trt.float32)
        pinned += 1
    return pinned


def _optimisation_profile(
    builder: Any, network: Any, ranges: dict[str, tuple[int, int, int]]
) -> Any | None:
    """A profile for the network's dynamic inputs, or None when every input shape is fixed."""
    profile = builder.create_optimization_profile()
    dynamic = False
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        shape = tuple(tensor.shape)
        if all(d >= 0 for d in shape):
            continue
        axes = DYNAMIC_AXES.get(tensor.name, ())
        known = len(axes) == len(shape) and all(d >= 0 or a for d, a in zip(shape, axes, strict=False))
        if not known:
            raise ExportError(f"input {tensor.name} has a dynamic shape {shape} this builder does not know")
        bounds = [
            tuple(ranges[axis][k] if d < 0 and axis else d for d, axis in zip(shape, axes, strict=True))
            for k in range(3)
        ]
        profile.set_shape(tensor.name, *bounds)
        dynamic = True
    return profile if dynamic else None


def _build_plan(trt: ModuleType, onnx_path: Path, plan_path: Path, fp16: bool, tf32: bool,
                workspace_gib: float, ranges: dict[str, tuple[int, int, int]]) -> int:
    """Build one plan into `plan_path`; returns how many layers were pinned to fp32."""
    logger = _collecting_logger(trt)
    builder = trt.Builder(logger)
    network, _parser = _parse_onnx(trt, builder, logger, onnx_path)  # _parser: keeps the weights alive
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
    if not tf32:
        config.clear_flag(trt.BuilderFlag.TF32)  # TensorRT enables TF32 by default; fp32 means fp32 here
    pinned = 0
    if fp16:
        config.set_flag(trt.BuilderFlag.FP16)
        pinned = keep_normalisation_in_fp32(trt, network)
        config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
    profile = _optimisation_profile(builder, network, ranges)
    if profile is not None:
        config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        details = "\n  ".join(logger.errors) or "(TensorRT logged no error)"
        raise ExportError(f"TensorRT {trt.__version__} failed to build a plan from {onnx_path}:\n  {details}")
    tmp = plan_path.with_suffix(".plan.tmp")
    with open(tmp, "wb") as f:
        f.write(memoryview(serialized))
    tmp.replace(plan_path)
    return pinned


def state_rank_range(engine_dir: Path, max_points: int) -> tuple[int, int, int]:
    """(min, opt, max) of the prompt head's state rank for 1..max_points points, read off the graph itself: its
    outputs for one prompt of 1 and of `max_points` points (ONNX Runtime on CPU, zero features)."""
    import numpy as np

    from sam2serve.engines.base import ImageFeatures
    from sam2serve.engines.onnx_engine import OnnxEngine

    engine = OnnxEngine(engine_dir, providers=["CPUExecutionProvider"], warmup=False, verify_hashes=False)
    assert engine.factored is not None
    features = ImageFeatures(*(np.zeros(t.shape, np.float32) for t in engine.manifest.engines["encoder"].outputs))

    def rank(points: int) -> int:
        coords = np.full((1, points, 2), 512.0, np.float32)
        return int(engine.factored.prompt_head(features, coords, np.ones((1, points), np.float32))[1]["coeffs"]
                   .shape[1])

    low = rank(1)
    return low, low, rank(max_points)


def build_trt_engines(
    engine_dir: Path,
    fp16: bool = False,
    max_batch: int = 1024,
    opt_batch: int = 64,
    max_points: int = 16,
    workspace_gib: float = 8,
    progress: bool = True,
    tf32: bool = False,
) -> Path:
    """Build encoder.plan, decoder.plan and (when exported) the factored decoder's plans for this GPU; returns
    `engine_dir/trt/<key>/`.

    The decoders' profiles cover prompt batches 1..max_batch (tuned for opt_batch) of 1..max_points
    points each. `fp16` builds half-precision plans with normalisation kept in fp32; fp32 plans use
    TF32 tensor cores only when `tf32` is set (faster, ~1e-3 relative error).
    """
    trt = _import_tensorrt()
    if not 1 <= opt_batch <= max_batch or max_points < 1:
        raise ExportError(f"need 1 ≤ opt_batch ≤ max_batch and max_points ≥ 1 (got {opt_batch}, {max_batch}, "
                          f"{max_points})")
    engine_dir = Path(engine_dir)
    try:
        manifest = read_manifest(engine_dir)
        roles = plan_roles(manifest)
        verify_engine_files(engine_dir, manifest, list(roles))
        gpu = current_gpu()
    except ManifestError as e:
        raise ExportError(str(e)) from None
    key = plan_key_for(gpu, trt.__version__)
    out_dir = engine_dir / TRT_DIR / key
    out_dir.mkdir(parents=True, exist_ok=True)
    # A manifest left from an earlier build would vouch for half-rebuilt plans.
    (out_dir / TRT_MANIFEST_NAME).unlink(missing_ok=True)
    ranges = {"batch": (1, opt_batch, max_batch), "points": (1, 1, max_points)}
    if "mask_head" in roles:
        ranges["rank"] = state_rank_range(engine_dir, max_points)
    plans: dict[str, dict[str, Any]] = {}
    seconds: dict[str, float] = {}
    with tqdm(roles, desc=f"TensorRT {key}", unit="plan", disable=not progress) as bar:
        for role in bar:
            bar.set_postfix_str(f"building {role}")
            onnx = manifest.engine_file(role)
            plan_path = out_dir / f"{role}.plan"
            start = time.perf_counter()
            pinned = _build_plan(trt, engine_dir / onnx.file, plan_path, fp16, tf32, workspace_gib, ranges)
            seconds[role] = round(time.perf_counter() - start, 1)
            log.info("built %s plan in %.1f s%s", role, seconds[role],
                     f" ({pinned} normalisation layers kept in fp32)" if fp16 else "")
            plans[role] = {
                "file": plan_path.name,
                "sha256": sha256_file(plan_path),
                "bytes": plan_path.stat().st_size,
                "onnx_file": onnx.file,
                "onnx_sha256": onnx.sha256,
                "fp32_pinned_layers": pinned,
            }
    trt_manifest = {
        "format_version": TRT_FORMAT_VERSION,
        "key": key,
        "gpu": {"name": gpu.name, "compute_capability": "{}.{}".format(*gpu.compute_capability)},
        "tensorrt": trt.__version__,
        "fp16": fp16,
        "tf32": tf32,
        "workspace_gib": workspace_gib,
        "profile": {axis: list(bounds) for axis, bounds in ranges.items()},
        "plans": plans,
        "build_seconds": seconds,
        "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }
    tmp = out_dir / f"{TRT_MANIFEST_NAME}.tmp"
    tmp.write_text(json.dumps(trt_manifest, indent=2) + "\n")
    tmp.replace(out_dir / TRT_MANIFEST_NAME)
    return out_dir
