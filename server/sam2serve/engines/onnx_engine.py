"""ONNX Runtime backend: TensorRT EP → CUDA EP → CPU EP, whichever this onnxruntime build offers."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort

from .base import EngineInfo, ImageFeatures, decoder_feeds, warn_if_untrained
from .contract import (
    DECODER_INPUTS,
    DECODER_OUTPUTS,
    ENCODER_INPUTS,
    ENCODER_OUTPUTS,
    FACTORED_ROLES,
)
from .factored import (
    CPU_PROMPT_HEAD_BATCH,
    DEFAULT_DECODER_MEMORY,
    FactoredDecoder,
    FactoredDecoding,
    check_factored_graphs,
)
from .manifest import (
    Manifest,
    ManifestError,
    TensorSpec,
    check_signature,
    read_manifest,
    verify_engine_files,
)

log = logging.getLogger(__name__)

PREFERRED_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
_ORT_DTYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(int64)": "int64",
               "tensor(int32)": "int32", "tensor(bool)": "bool"}


# ORT fuses an Add into the LayerNormalization after it (SkipLayerNormalization); on CPUs that kernel is ~3× slower
# than the two operators apart for rows of 64 channels (the mask head's upscaling: 56 ms against 21 ms for a batch of
# 8, measured on a 2-core AVX2 EPYC), and no other graph here matches the pattern.
CPU_DISABLED_OPTIMIZERS = ("SkipLayerNormFusion",)


# Factored heads on CPUs: batches run on one thread each, as many at once as there are intra-op threads. Their graphs
# are ~250 small memory-bound operators; splitting each across threads costs a wake-up per operator (prompt head on
# 2 cores: 10.2 ms per prompt with 2 workers against 11.2-11.5 ms with 2 intra-op threads; mask head 17.5 against
# 19.7 ms). Capped where it was not measured.
MAX_AUTO_HEAD_WORKERS = 4


def cpu_head_workers(intra_op_threads: int) -> int:
    """Head workers for the CPU provider: the intra-op thread count (0: the cores this process may use), capped."""
    if intra_op_threads > 0:
        threads = intra_op_threads
    elif hasattr(os, "sched_getaffinity"):  # Linux: the cores this process may run on
        threads = len(os.sched_getaffinity(0))
    else:
        threads = os.cpu_count() or 1
    return max(1, min(threads, MAX_AUTO_HEAD_WORKERS))


def default_providers() -> list[str]:
    available = set(ort.get_available_providers())
    return [p for p in PREFERRED_PROVIDERS if p in available]


def session_signature(args: list[ort.NodeArg]) -> list[TensorSpec]:
    return [TensorSpec(a.name, _ORT_DTYPES.get(a.type, a.type), list(a.shape)) for a in args]


class OnnxEngine(FactoredDecoding):
    """Opens a validated engine directory and runs its encoder/decoder as plain numpy in/out."""

    backend = "onnxruntime"

    def __init__(
        self,
        directory: Path | str,
        providers: list[str] | None = None,
        intra_op_threads: int = 0,
        encoder_variant: str = "encoder",
        warmup: bool = True,
        verify_hashes: bool = True,
        decoder_mem_arena: bool = True,
        factored: bool = True,
        decoder_memory_bytes: int = DEFAULT_DECODER_MEMORY,
        head_workers: int | None = None,
        prompt_head_batch: int | None = None,
    ) -> None:
        """`factored=False` runs every prompt through decoder.onnx (as engine directories exported before the
        factored decoder do); `decoder_memory_bytes` bounds the working memory of a factored head's batch;
        `head_workers` > 1 runs the factored heads' batches that many at a time, one thread each (default: on the
        CPU provider, one per intra-op thread, see cpu_head_workers; elsewhere 1);
        `prompt_head_batch` bounds the prompt head's batch (default: CPU_PROMPT_HEAD_BATCH on the CPU provider,
        memory alone on an accelerator)."""
        self.directory = Path(directory)
        self.manifest: Manifest = read_manifest(self.directory)
        has_factored = set(FACTORED_ROLES) <= set(self.manifest.engines)
        if factored and not has_factored:
            log.info("%s has no factored decoder (exported before it existed): every prompt runs decoder.onnx; "
                     "re-export the engines for a decoder about ten times cheaper", self.directory)
        roles = [encoder_variant, "decoder", *(FACTORED_ROLES if factored and has_factored else ())]
        if verify_hashes:
            verify_engine_files(self.directory, self.manifest, roles)
        self.providers = list(providers) if providers else default_providers()
        unknown = [p for p in self.providers if p not in ort.get_available_providers()]
        if unknown:
            raise ManifestError(
                f"execution providers {unknown} are not available in this onnxruntime build "
                f"(available: {ort.get_available_providers()})"
            )
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = intra_op_threads
        options.inter_op_num_threads = 1
        # Idle ORT threads spin by default and steal CPU from image work running beside them.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.encoder_role = encoder_variant
        # ORT's CPU arena keeps a session's peak working set allocated for the process's life. The encoder runs
        # once per image (crop), so it goes without: ~0.9 GB that would otherwise sit beside the decoder's.
        # The decoder runs hundreds of times per image and keeps its arena (without it, each run page-faults
        # its buffers anew: 27 % slower measured at batch 16).
        options.enable_cpu_mem_arena = False
        self._encoder = self._open(encoder_variant, options, ENCODER_INPUTS, ENCODER_OUTPUTS)
        options.enable_cpu_mem_arena = decoder_mem_arena
        self._decoder = self._open("decoder", options, DECODER_INPUTS, DECODER_OUTPUTS)
        self._factored: FactoredDecoder | None = None
        if factored and has_factored:
            if head_workers is None:
                head_workers = cpu_head_workers(intra_op_threads) if self.providers[0] == "CPUExecutionProvider" else 1
            if prompt_head_batch is None and self.providers[0] == "CPUExecutionProvider":
                prompt_head_batch = CPU_PROMPT_HEAD_BATCH
            self._factored = self._open_factored(options, decoder_memory_bytes, head_workers, prompt_head_batch)
        warn_if_untrained(self.directory, self.manifest)
        if encoder_variant != "encoder":
            entry = self.manifest.engine_file(encoder_variant)
            log.warning("opt-in encoder %s (%s): faster on CPUs, but its masks differ slightly from Meta's reference",
                        entry.file, entry.precision)
        if warmup:
            self.warm_up()

    def _open_factored(self, options: ort.SessionOptions, memory_bytes: int, workers: int,
                       prompt_batch: int | None) -> FactoredDecoder:
        context, prompt, mask = (self._open(role, options) for role in FACTORED_ROLES)
        names = [[a.name for a in args] for args in (context.get_outputs(), prompt.get_inputs(),
                                                     prompt.get_outputs(), mask.get_inputs(), mask.get_outputs())]
        check_factored_graphs(*names)

        def runner(session: ort.InferenceSession) -> Callable[[dict[str, np.ndarray]], list[np.ndarray]]:
            return lambda feeds: session.run(None, feeds)

        side_by_side = None
        if workers > 1:  # the heads again, one thread each, for batches run side by side (see FactoredDecoder)
            threads = options.intra_op_num_threads
            options.intra_op_num_threads = 1
            side_by_side = (runner(self._open("prompt_head", options)), runner(self._open("mask_head", options)))
            options.intra_op_num_threads = threads
        return FactoredDecoder(self.manifest, runner(context), runner(prompt), runner(mask), names[0], names[1],
                               names[3], memory_bytes, workers=workers, prompt_batch=prompt_batch,
                               side_by_side=side_by_side)

    def _open(self, role: str, options: ort.SessionOptions, inputs: tuple[str, ...] | None = None,
              outputs: tuple[str, ...] | None = None) -> ort.InferenceSession:
        """`inputs`/`outputs`: the names this server needs, when the contract fixes them (the factored graphs'
        names are checked against each other instead)."""
        entry = self.manifest.engine_file(role)
        declared_in, declared_out = tuple(t.name for t in entry.inputs), tuple(t.name for t in entry.outputs)
        if inputs is not None and outputs is not None and (declared_in != inputs or declared_out != outputs):
            raise ManifestError(
                f"{role} in the manifest declares inputs {[t.name for t in entry.inputs]} and outputs "
                f"{[t.name for t in entry.outputs]}; this server needs {list(inputs)} → {list(outputs)}"
            )
        disabled = CPU_DISABLED_OPTIMIZERS if self.providers[0] == "CPUExecutionProvider" else ()
        try:
            session = ort.InferenceSession(str(self.directory / entry.file), options, providers=self.providers,
                                           disabled_optimizers=list(disabled))
        except Exception as e:  # ORT raises its own exception types (Fail, InvalidGraph, ...)
            raise ManifestError(f"onnxruntime cannot load {role} engine {entry.file}: {e}") from None
        check_signature(role, entry.inputs, session_signature(session.get_inputs()), "input")
        check_signature(role, entry.outputs, session_signature(session.get_outputs()), "output")
        return session

    @property
    def active_providers(self) -> list[str]:
        return self._decoder.get_providers()

    @property
    def info(self) -> EngineInfo:
        return EngineInfo(self.backend, tuple(self.active_providers), self.manifest.weights.trained,
                          self.manifest.engine_file(self.encoder_role).precision)

    def encode(self, image: np.ndarray) -> ImageFeatures:
        outputs = self._encoder.run(list(ENCODER_OUTPUTS), {"image": np.ascontiguousarray(image, np.float32)})
        return ImageFeatures(*outputs)

    def decode_all_tokens(
        self,
        features: ImageFeatures,
        point_coords: np.ndarray,
        point_labels: np.ndarray,
        mask_input: np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Logits and IoU of every mask token, [B, T, 256, 256] and [B, T]: the factored decoder without a mask
        input (when exported), decoder.onnx with one."""
        if mask_input is None and self._factored is not None:
            return self._factored.decode_all_tokens(features, point_coords, point_labels)
        masks, iou = self._decoder.run(list(DECODER_OUTPUTS), decoder_feeds(
            features, point_coords, point_labels, mask_input, self.manifest.low_res_mask_size))
        return masks, iou

    def close(self) -> None:
        self._encoder = self._decoder = self._factored = None
