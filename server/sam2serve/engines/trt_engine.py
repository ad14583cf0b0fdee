"""TensorRT backend: runs the .plan files `build_trt_engines` wrote for this GPU, numpy in/out.

Plans only run on the GPU model and TensorRT version they were built with, so they live under
`<engine dir>/trt/<key>/` (key = GPU name + compute capability + TensorRT version) beside a
`trt_manifest.json` recording each plan's SHA-256 and the SHA-256 of the ONNX it was built from.
`tensorrt` and `cuda-python` are imported only when an engine is opened (the `trt` extra).
"""

from __future__ import annotations

import json
import logging
import re
import subprocess
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from .base import PER_PROMPT_INPUTS, ImageFeatures, decoder_feeds, warn_if_untrained
from .contract import (
    DECODER_INPUTS,
    DECODER_OUTPUTS,
    ENCODER_INPUTS,
    ENCODER_OUTPUTS,
    FACTORED_ROLES,
    PROMPT_INPUTS,
    PROMPT_STATE,
)
from .factored import DEFAULT_DECODER_MEMORY, FactoredDecoder, FactoredDecoding, check_factored_graphs
from .manifest import (
    Manifest,
    ManifestError,
    TensorSpec,
    check_signature,
    read_manifest,
    sha256_file,
    verify_engine_files,
)

log = logging.getLogger(__name__)

TRT_DIR = "trt"
TRT_MANIFEST_NAME = "trt_manifest.json"
TRT_FORMAT_VERSION = 1
PLAN_ROLES = ("encoder", "decoder")  # always built; the factored decoder's plans too when the directory has it
FEATURE_NAMES = ("image_embed", "high_res_feats_0", "high_res_feats_1")
FEATURE_NAMES_SET = frozenset(FEATURE_NAMES)
INSTALL_HINT = "pip install 'sam2serve[trt]' on a machine with an NVIDIA GPU"


class GpuNotFoundError(ManifestError):
    """No NVIDIA GPU could be queried (neither through cuda-python nor nvidia-smi)."""


class CudaError(RuntimeError):
    """A CUDA runtime call failed while running a plan."""


@dataclass(frozen=True)
class GpuInfo:
    name: str
    compute_capability: tuple[int, int]

    @property
    def sm(self) -> str:
        return f"sm{self.compute_capability[0]}{self.compute_capability[1]}"


def slugify(text: str) -> str:
    return re.sub(r"[^a-z0-9.]+", "-", text.lower()).strip("-")


def plan_key_for(gpu: GpuInfo, trt_version: str) -> str:
    """e.g. `nvidia-h100-80gb-hbm3_sm90_trt10.8.0` (TensorRT version up to its patch number)."""
    return f"{slugify(gpu.name)}_{gpu.sm}_trt{'.'.join(trt_version.split('.')[:3])}"


def import_cudart() -> ModuleType:
    """cuda-python's runtime bindings: `cuda.bindings.runtime` (cuda-python ≥ 12.6) or `cuda.cudart`."""
    try:
        from cuda.bindings import runtime
    except ImportError:
        from cuda import cudart as runtime  # older cuda-python; ImportError propagates when absent
    return runtime


def cuda_call(cudart: ModuleType, function: str, *args: Any) -> Any:
    """Call `cudart.<function>`, raise CudaError unless it succeeded, return its value(s)."""
    error, *values = getattr(cudart, function)(*args)
    if error != cudart.cudaError_t.cudaSuccess:
        _, text = cudart.cudaGetErrorString(error)
        name = getattr(error, "name", error)
        raise CudaError(f"{function} failed: {name}: {text.decode(errors='replace')}")
    if not values:
        return None
    return values[0] if len(values) == 1 else tuple(values)


def gpu_from_cudart(cudart: ModuleType) -> GpuInfo:
    device = cuda_call(cudart, "cudaGetDevice")
    props = cuda_call(cudart, "cudaGetDeviceProperties", device)
    name = props.name
    if isinstance(name, bytes):
        name = name.split(b"\0", 1)[0].decode(errors="replace")
    return GpuInfo(name.strip(), (int(props.major), int(props.minor)))


def gpu_from_nvidia_smi_line(line: str) -> GpuInfo:
    """One line of `nvidia-smi --query-gpu=name,compute_cap --format=csv,noheader`: `NAME, 9.0`."""
    name, _, capability = line.strip().rpartition(",")
    major, _, minor = capability.strip().partition(".")
    if not name or not major.isdigit() or not minor.isdigit():
        raise GpuNotFoundError(f"cannot read nvidia-smi's GPU line {line!r}")
    return GpuInfo(name.strip(), (int(major), int(minor)))


def current_gpu() -> GpuInfo:
    """The GPU CUDA would run on: cuda-python's current device, else the first GPU nvidia-smi lists."""
    reasons = []
    try:
        return gpu_from_cudart(import_cudart())
    except ImportError:
        reasons.append("cuda-python is not installed")
    except CudaError as e:
        reasons.append(str(e))
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,compute_cap", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=30, check=True,
        ).stdout
        lines = [line for line in out.splitlines() if line.strip()]
        if lines:
            return gpu_from_nvidia_smi_line(lines[0])
        reasons.append("nvidia-smi lists no GPU")
    except (OSError, subprocess.SubprocessError) as e:
        reasons.append(f"nvidia-smi failed: {e}")
    raise GpuNotFoundError(f"no NVIDIA GPU found ({'; '.join(reasons)})")


def shared_max_batch(max_shapes: dict[tuple[str, str], tuple[int, ...]]) -> int:
    """The largest prompt batch every plan a factored decode runs accepts: the least batch dimension of the
    profile's max shape over each plan's per-prompt inputs ((plan, input) → max shape). One plan built with
    a smaller profile (a mask head limited for memory, say) bounds them all."""
    if not max_shapes:
        raise ValueError("no per-prompt inputs to take a batch bound from")
    return min(shape[0] for shape in max_shapes.values())


def read_trt_manifest(plan_dir: Path) -> dict[str, Any]:
    path = plan_dir / TRT_MANIFEST_NAME
    if not path.is_file():
        raise ManifestError(f"{path} is missing: the TensorRT build in {plan_dir} did not finish; rebuild it")
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ManifestError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(raw, dict) or raw.get("format_version") != TRT_FORMAT_VERSION:
        raise ManifestError(f"{path}: not a TensorRT manifest of format_version {TRT_FORMAT_VERSION}")
    plans = raw.get("plans")
    if not isinstance(plans, dict) or any(
        not isinstance(plans.get(role), dict) or not {"file", "sha256", "onnx_sha256"} <= plans[role].keys()
        for role in PLAN_ROLES
    ):
        raise ManifestError(f"{path}: needs plans.encoder and plans.decoder with file, sha256, onnx_sha256")
    return raw


def plan_roles(manifest: Manifest) -> tuple[str, ...]:
    """The roles `export trt` builds for this engine directory: encoder, decoder and, when exported, the factored
    decoder's three graphs."""
    return PLAN_ROLES + (FACTORED_ROLES if set(FACTORED_ROLES) <= set(manifest.engines) else ())


def verify_plans(plan_dir: Path, trt_manifest: dict[str, Any], manifest: Manifest, hashes: bool) -> None:
    """Each plan was built from the ONNX the manifest names now and (if `hashes`) is unchanged since."""
    for role in [r for r in plan_roles(manifest) if r in PLAN_ROLES or r in trt_manifest["plans"]]:
        entry = trt_manifest["plans"][role]
        onnx = manifest.engine_file(role)
        if entry["onnx_sha256"] != onnx.sha256:
            raise ManifestError(
                f"{role} plan in {plan_dir} was built from an ONNX with SHA-256 {entry['onnx_sha256']}, but "
                f"{onnx.file} is now {onnx.sha256}: the engines were re-exported; rebuild the TensorRT plans"
            )
        path = plan_dir / entry["file"]
        if not path.is_file():
            raise ManifestError(f"{role} plan {path} is missing (listed in {TRT_MANIFEST_NAME})")
        if hashes and (actual := sha256_file(path)) != entry["sha256"]:
            raise ManifestError(
                f"{role} plan {path} has SHA-256 {actual}, {TRT_MANIFEST_NAME} says {entry['sha256']}: "
                "the file was changed after the build; rebuild the TensorRT plans"
            )


def _import_backends() -> tuple[ModuleType, ModuleType]:
    try:
        import tensorrt
    except ImportError:
        raise ManifestError(
            f"the TensorRT backend needs the `tensorrt` package, which is not installed: {INSTALL_HINT}"
        ) from None
    try:
        cudart = import_cudart()
    except ImportError:
        raise ManifestError(
            f"the TensorRT backend needs the `cuda-python` package (cuda.bindings), which is not installed: "
            f"{INSTALL_HINT}"
        ) from None
    return tensorrt, cudart


class _DeviceBuffers:
    """One grow-only device allocation per tensor name."""

    def __init__(self, cudart: ModuleType) -> None:
        self._cudart = cudart
        self._allocations: dict[str, tuple[int, int]] = {}  # name → (pointer, bytes)

    def get(self, name: str, nbytes: int) -> int:
        pointer, capacity = self._allocations.get(name, (0, 0))
        if capacity < nbytes:
            if pointer:
                cuda_call(self._cudart, "cudaFree", pointer)
                del self._allocations[name]
            pointer = int(cuda_call(self._cudart, "cudaMalloc", max(nbytes, 1)))
            self._allocations[name] = (pointer, nbytes)
        return pointer

    def free(self) -> None:
        for pointer, _ in self._allocations.values():
            cuda_call(self._cudart, "cudaFree", pointer)
        self._allocations.clear()


class _PlanRunner:
    """One deserialised plan with its execution context and device buffers."""

    def __init__(self, trt: ModuleType, cudart: ModuleType, stream: Any, path: Path, role: str) -> None:
        self.role = role
        self._trt, self._cudart, self._stream = trt, cudart, stream
        self._runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))  # must outlive the engine
        self.engine = self._runtime.deserialize_cuda_engine(path.read_bytes())
        if self.engine is None:
            raise ManifestError(
                f"TensorRT {trt.__version__} cannot deserialise {path}: it was built for another GPU or "
                "TensorRT version, or is damaged; rebuild the TensorRT plans on this machine"
            )
        self.context = self.engine.create_execution_context()
        if self.context is None:
            raise ManifestError(f"TensorRT cannot create an execution context for {path} (GPU memory full?)")
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        is_input = {n: self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT for n in names}
        self.inputs = [n for n in names if is_input[n]]
        self.outputs = [n for n in names if not is_input[n]]
        self.dtypes = {n: np.dtype(trt.nptype(self.engine.get_tensor_dtype(n))) for n in names}
        self._buffers = _DeviceBuffers(cudart)
        self._resident: dict[str, np.ndarray] = {}  # input name → the array its buffer holds

    def signature(self, names: list[str]) -> list[TensorSpec]:
        shapes = {n: [d if d >= 0 else None for d in self.engine.get_tensor_shape(n)] for n in names}
        return [TensorSpec(n, self.dtypes[n].name, shapes[n]) for n in names]

    def profile_shapes(self, name: str) -> tuple[tuple[int, ...], ...]:
        """(min, opt, max) shape of input `name` in optimisation profile 0."""
        return tuple(tuple(s) for s in self.engine.get_tensor_profile_shape(name, 0))

    def run(self, feeds: dict[str, np.ndarray], keep: frozenset[str] = frozenset()) -> list[np.ndarray]:
        """Outputs in engine order.

        Inputs named in `keep` are not copied again when the same array object was the last one copied
        to that input: image features are reused across many decode calls and are never modified in place.
        """
        h2d = self._cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
        d2h = self._cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        staged = []  # host arrays must stay alive until the stream is synchronised
        for name in self.inputs:
            given = feeds[name]
            array = np.ascontiguousarray(given, self.dtypes[name])
            if not self.context.set_input_shape(name, array.shape):
                raise ValueError(
                    f"{self.role} input {name} has shape {array.shape}, outside the plan's profile "
                    f"(min, opt, max) {self.profile_shapes(name)}"
                )
            pointer = self._buffers.get(name, array.nbytes)
            if not (name in keep and self._resident.get(name) is given):
                cuda_call(self._cudart, "cudaMemcpyAsync", pointer, array.ctypes.data, array.nbytes, h2d,
                          self._stream)
                staged.append(array)
                if name in keep:
                    self._resident[name] = given
            self.context.set_tensor_address(name, pointer)
        results = []
        for name in self.outputs:
            shape = tuple(self.context.get_tensor_shape(name))
            if any(d < 0 for d in shape):
                raise RuntimeError(f"{self.role} output {name} has unresolved shape {shape}")
            result = np.empty(shape, self.dtypes[name])
            self.context.set_tensor_address(name, self._buffers.get(name, result.nbytes))
            results.append(result)
        try:
            if not self.context.execute_async_v3(int(self._stream)):
                raise CudaError(f"TensorRT failed to enqueue the {self.role} plan")
            for name, result in zip(self.outputs, results, strict=True):
                cuda_call(self._cudart, "cudaMemcpyAsync", result.ctypes.data, self._buffers.get(name, 0),
                          result.nbytes, d2h, self._stream)
        finally:
            cuda_call(self._cudart, "cudaStreamSynchronize", self._stream)
        return results

    def close(self) -> None:
        self._resident.clear()
        self.context = None
        self.engine = None
        self._buffers.free()


class TensorRTEngine(FactoredDecoding):
    """Opens an engine directory's TensorRT plans for this GPU; same interface as OnnxEngine."""

    backend = "tensorrt"

    def __init__(
        self,
        directory: Path | str,
        plan_key: str | None = None,
        warmup: bool = True,
        verify_hashes: bool = True,
        decoder_memory_bytes: int = DEFAULT_DECODER_MEMORY,
        factored: bool = True,
    ) -> None:
        """`factored=False` runs every prompt through the decoder plan (as plans built before the factored decoder
        do); `decoder_memory_bytes` bounds the host memory of a factored head's batch."""
        trt, cudart = _import_backends()
        self.directory = Path(directory)
        self.providers = ["TensorRT"]
        self.manifest: Manifest = read_manifest(self.directory)
        if verify_hashes:
            verify_engine_files(self.directory, self.manifest, list(PLAN_ROLES))
        self.plan_dir = self._find_plan_dir(plan_key, trt.__version__, cudart)
        self.trt_manifest = read_trt_manifest(self.plan_dir)
        built_with = self.trt_manifest.get("tensorrt")
        if built_with != trt.__version__:
            raise ManifestError(
                f"plans in {self.plan_dir} were built with TensorRT {built_with}, this is {trt.__version__}: "
                "rebuild the TensorRT plans"
            )
        verify_plans(self.plan_dir, self.trt_manifest, self.manifest, hashes=verify_hashes)
        self._cudart = cudart
        self._lock = threading.Lock()  # an execution context runs one call at a time
        self._encoder: _PlanRunner | None = None
        self._decoder: _PlanRunner | None = None
        self._factored_runners: dict[str, _PlanRunner] = {}
        self._factored: FactoredDecoder | None = None
        self._stream = cuda_call(cudart, "cudaStreamCreate")
        try:
            self._encoder = self._open(trt, "encoder", ENCODER_INPUTS, ENCODER_OUTPUTS)
            self._decoder = self._open(trt, "decoder", DECODER_INPUTS, DECODER_OUTPUTS)
            _, _, (self.max_batch, self.max_points, _) = self._decoder.profile_shapes("point_coords")
            has_plans = all(role in self.trt_manifest["plans"] for role in FACTORED_ROLES)
            if factored and has_plans:
                self._factored = self._open_factored(trt, decoder_memory_bytes)
            elif factored and set(FACTORED_ROLES) <= set(self.manifest.engines):
                log.info("plans in %s predate the factored decoder: every prompt runs the decoder plan; rebuild the "
                         "TensorRT plans for the factored one", self.plan_dir)
            warn_if_untrained(self.directory, self.manifest)
            if warmup:
                self.warm_up()
        except BaseException:
            self.close()
            raise

    def _find_plan_dir(self, plan_key: str | None, trt_version: str, cudart: ModuleType) -> Path:
        root = self.directory / TRT_DIR
        available = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
        if plan_key is None:
            try:
                gpu = gpu_from_cudart(cudart)
            except CudaError as e:
                raise GpuNotFoundError(f"the TensorRT backend cannot query the GPU: {e}") from None
            plan_key = plan_key_for(gpu, trt_version)
        if plan_key not in available:
            raise ManifestError(
                f"no TensorRT plans {plan_key!r} in {root} (built: {', '.join(available) or 'none'}); "
                "plans only run on the GPU and TensorRT version they were built with: build them on this "
                "machine (`export trt`)"
            )
        return root / plan_key

    def _open_factored(self, trt: ModuleType, memory_bytes: int) -> FactoredDecoder:
        runners = {role: self._open(trt, role) for role in FACTORED_ROLES}
        self._factored_runners = runners
        declared = {role: self.manifest.engine_file(role) for role in FACTORED_ROLES}
        context, prompt, mask = (declared[r] for r in FACTORED_ROLES)
        names = [[t.name for t in ts] for ts in (context.outputs, prompt.inputs, prompt.outputs, mask.inputs,
                                                   mask.outputs)]
        check_factored_graphs(*names)
        context_names = frozenset(names[0])

        def run(role: str) -> Callable[[dict[str, np.ndarray]], list[np.ndarray]]:
            order = [t.name for t in declared[role].outputs]

            def call(feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
                with self._lock:
                    runner = self._factored_runners[role]
                    outputs = dict(zip(runner.outputs, runner.run(feeds, keep=context_names | FEATURE_NAMES_SET),
                                       strict=True))
                return [outputs[name] for name in order]

            return call

        per_prompt = {("prompt_head", n): runners["prompt_head"].profile_shapes(n)[2] for n in PROMPT_INPUTS}
        per_prompt |= {("mask_head", n): runners["mask_head"].profile_shapes(n)[2] for n in PROMPT_STATE}
        per_prompt[("decoder", "point_coords")] = (self.max_batch,)
        max_batch = shared_max_batch(per_prompt)
        return FactoredDecoder(self.manifest, run("decoder_context"), run("prompt_head"), run("mask_head"),
                               names[0], names[1], names[3], memory_bytes, max_batch=max_batch)

    def _open(
        self, trt: ModuleType, role: str, inputs: tuple[str, ...] | None = None,
        outputs: tuple[str, ...] | None = None,
    ) -> _PlanRunner:
        """`inputs`/`outputs`: the names this server needs, when the contract fixes them (the factored graphs'
        names are checked against each other and the manifest instead)."""
        path = self.plan_dir / self.trt_manifest["plans"][role]["file"]
        runner = _PlanRunner(trt, self._cudart, self._stream, path, role)
        entry = self.manifest.engine_file(role)
        if inputs is None or outputs is None:
            inputs, outputs = tuple(t.name for t in entry.inputs), tuple(t.name for t in entry.outputs)
            if set(runner.inputs) != set(inputs) or set(runner.outputs) != set(outputs):
                raise ManifestError(f"{role} plan {path} has inputs {runner.inputs} and outputs {runner.outputs}; "
                                    f"its ONNX declares {list(inputs)} → {list(outputs)}")
            check_signature(role, [t for n in runner.inputs for t in entry.inputs if t.name == n],
                            runner.signature(runner.inputs), "input")
            check_signature(role, [t for n in runner.outputs for t in entry.outputs if t.name == n],
                            runner.signature(runner.outputs), "output")
            return runner
        if tuple(runner.inputs) != inputs or tuple(runner.outputs) != outputs:
            raise ManifestError(
                f"{role} plan {path} has inputs {runner.inputs} and outputs {runner.outputs}; "
                f"this server needs {list(inputs)} → {list(outputs)}"
            )
        check_signature(role, entry.inputs, runner.signature(runner.inputs), "input")
        check_signature(role, entry.outputs, runner.signature(runner.outputs), "output")
        return runner

    def _runner(self, role: str) -> _PlanRunner:
        runner = self._encoder if role == "encoder" else self._decoder
        if runner is None:
            raise RuntimeError("the TensorRT engine is closed")
        return runner

    def encode(self, image: np.ndarray) -> ImageFeatures:
        with self._lock:
            outputs = self._runner("encoder").run({"image": image})
        return ImageFeatures(*outputs)

    def decode_all_tokens(
        self,
        features: ImageFeatures,
        point_coords: np.ndarray,
        point_labels: np.ndarray,
        mask_input: np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Logits and IoU of every mask token, [B, T, 256, 256] and [B, T]: the factored decoder's plans without a
        mask input (when built), the decoder plan with one.

        Batches above the plans' profile maximum run in chunks of that size.
        """
        batch, points = point_coords.shape[:2]
        if batch == 0:
            raise ValueError("decode needs at least one prompt")
        if points > self.max_points:  # the factored plans are built for the same range of points
            raise ValueError(
                f"{points} points per prompt; the TensorRT plan was built for at most {self.max_points}"
            )
        if mask_input is None and self._factored is not None:
            return self._factored.decode_all_tokens(features, point_coords, point_labels)
        feeds = decoder_feeds(features, point_coords, point_labels, mask_input, self.manifest.low_res_mask_size)
        masks, iou = [], []
        with self._lock:
            decoder = self._runner("decoder")
            for start in range(0, batch, self.max_batch):
                chunk = slice(start, start + self.max_batch)
                chunk_feeds = {name: value[chunk] if name in PER_PROMPT_INPUTS else value
                               for name, value in feeds.items()}
                chunk_masks, chunk_iou = decoder.run(chunk_feeds, keep=frozenset(FEATURE_NAMES))
                masks.append(chunk_masks)
                iou.append(chunk_iou)
        if len(masks) == 1:
            return masks[0], iou[0]
        return np.concatenate(masks), np.concatenate(iou)

    def close(self) -> None:
        with self._lock:
            for runner in (self._encoder, self._decoder, *self._factored_runners.values()):
                if runner is not None:
                    runner.close()
            self._encoder = self._decoder = self._factored = None
            self._factored_runners = {}
            if getattr(self, "_stream", None) is not None:
                cuda_call(self._cudart, "cudaStreamDestroy", self._stream)
                self._stream = None
