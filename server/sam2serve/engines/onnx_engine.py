"""ONNX Runtime backend: TensorRT EP → CUDA EP → CPU EP, whichever this onnxruntime build offers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort

from .base import AllTokensEngine, DecodedMasks, EngineInfo, ImageFeatures, decoder_feeds, warn_if_untrained
from .contract import (
    DECODER_INPUTS,
    DECODER_OUTPUTS,
    ENCODER_INPUTS,
    ENCODER_OUTPUTS,
    MASK_HEAD_INPUTS,
    MASK_HEAD_OUTPUTS,
    PROMPT_HEAD_INPUTS,
    PROMPT_HEAD_OUTPUTS,
)
from .manifest import (
    Manifest,
    ManifestError,
    TensorSpec,
    check_signature,
    read_manifest,
    verify_engine_files,
)
from .mask_selection import select_multimask

PREFERRED_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
_ORT_DTYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(int64)": "int64",
               "tensor(int32)": "int32", "tensor(bool)": "bool"}


def default_providers() -> list[str]:
    available = set(ort.get_available_providers())
    return [p for p in PREFERRED_PROVIDERS if p in available]


def session_signature(args: list[ort.NodeArg]) -> list[TensorSpec]:
    return [TensorSpec(a.name, _ORT_DTYPES.get(a.type, a.type), list(a.shape)) for a in args]


class OnnxEngine(AllTokensEngine):
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
    ) -> None:
        self.directory = Path(directory)
        self.manifest: Manifest = read_manifest(self.directory)
        self.manifest_split = {"prompt_head", "mask_head"} <= set(self.manifest.engines)
        roles = [encoder_variant, "decoder", *(["prompt_head", "mask_head"] if self.manifest_split else [])]
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
        self._prompt_head = self._mask_head = None
        if self.manifest_split:
            self._prompt_head = self._open("prompt_head", options, PROMPT_HEAD_INPUTS, PROMPT_HEAD_OUTPUTS)
            self._mask_head = self._open("mask_head", options, MASK_HEAD_INPUTS, MASK_HEAD_OUTPUTS)
        warn_if_untrained(self.directory, self.manifest)
        if warmup:
            self.warm_up()

    def _open(self, role: str, options: ort.SessionOptions, inputs: tuple[str, ...],
              outputs: tuple[str, ...]) -> ort.InferenceSession:
        entry = self.manifest.engine_file(role)
        if tuple(t.name for t in entry.inputs) != inputs or tuple(t.name for t in entry.outputs) != outputs:
            raise ManifestError(
                f"{role} in the manifest declares inputs {[t.name for t in entry.inputs]} and outputs "
                f"{[t.name for t in entry.outputs]}; this server needs {list(inputs)} → {list(outputs)}"
            )
        try:
            session = ort.InferenceSession(str(self.directory / entry.file), options, providers=self.providers)
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
        return EngineInfo(self.backend, tuple(self.active_providers), self.manifest.weights.trained)

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
        """The raw graph: logits and IoU of every mask token, [B, T, 256, 256] and [B, T]."""
        masks, iou = self._decoder.run(list(DECODER_OUTPUTS), decoder_feeds(
            features, point_coords, point_labels, mask_input, self.manifest.low_res_mask_size))
        return masks, iou

    @property
    def can_skip_masks(self) -> bool:
        """True when the split decoder is loaded, so that `decode_above` skips the masks it need not make."""
        return self._prompt_head is not None

    def decode_above(self, features: ImageFeatures, point_coords: np.ndarray, point_labels: np.ndarray,
                     iou_threshold: float) -> DecodedMasks:
        """With the split decoder, masks only for prompts with some multimask IoU above `iou_threshold`; the
        other prompts' logits are left at zero (callers filter them out by IoU)."""
        if self._prompt_head is None or self._mask_head is None:
            return super().decode_above(features, point_coords, point_labels, iou_threshold)
        iou, mask_tokens, image_tokens = self._prompt_head.run(list(PROMPT_HEAD_OUTPUTS), decoder_feeds(
            features, point_coords, point_labels, None, self.manifest.low_res_mask_size))
        size = self.manifest.low_res_mask_size
        masks = np.zeros((len(iou), iou.shape[1], size, size), np.float32)
        rows = np.flatnonzero((iou[:, 1:] > iou_threshold).any(axis=1))
        if len(rows):
            masks[rows] = self._mask_head.run(list(MASK_HEAD_OUTPUTS), {
                "image_tokens": image_tokens[rows], "mask_tokens": mask_tokens[rows],
                "high_res_feats_0": features.high_res_feats_0, "high_res_feats_1": features.high_res_feats_1})[0]
        return DecodedMasks(*select_multimask(masks, iou))

    def close(self) -> None:
        self._encoder = self._decoder = self._prompt_head = self._mask_head = None
