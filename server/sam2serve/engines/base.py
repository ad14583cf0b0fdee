"""The one small interface every engine backend (ONNX Runtime, TensorRT) implements."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from .manifest import Manifest
from .mask_selection import select_tokens

log = logging.getLogger(__name__)
UNTRAINED_WARNING = "UNTRAINED WEIGHTS: this server runs randomly initialised engines; its masks are meaningless"


@dataclass(frozen=True)
class ImageFeatures:
    """What the encoder computes once per image (or crop); the decoder reads it for every prompt."""

    image_embed: np.ndarray  # [1, 256, 64, 64]
    high_res_feats_0: np.ndarray  # [1, 32, 256, 256]
    high_res_feats_1: np.ndarray  # [1, 64, 128, 128]


@dataclass(frozen=True)
class DecodedMasks:
    """Low-resolution mask logits (not thresholded) and the model's IoU prediction for each."""

    low_res_logits: np.ndarray  # [B, M, 256, 256] float32
    iou_predictions: np.ndarray  # [B, M] float32


@dataclass(frozen=True)
class EngineInfo:
    """What serves the graphs, for GetInfo, metrics and logs."""

    backend: str  # "onnxruntime" or "tensorrt"
    providers: tuple[str, ...]  # execution providers in use, best first
    trained: bool  # False: weights were randomly initialised and masks are meaningless
    encoder_precision: str = "fp32"  # "int8-dynamic": the opt-in int8 encoder (masks differ slightly from Meta's)


class Engine(Protocol):
    manifest: Manifest

    @property
    def info(self) -> EngineInfo: ...

    def encode(self, image: np.ndarray) -> ImageFeatures:
        """`image`: normalised model input [1, 3, S, S] float32 (see `sam2serve.preprocess`)."""
        ...

    def decode(
        self,
        features: ImageFeatures,
        point_coords: np.ndarray,
        point_labels: np.ndarray,
        mask_input: np.ndarray | None = None,
        multimask: bool = True,
    ) -> DecodedMasks:
        """Prompts in the model input frame: coords [B, N, 2], labels [B, N] (1 positive, 0 negative).

        `mask_input` [B, 1, 256, 256] are low-res logits from an earlier pass (m2m refinement).
        `multimask=True` returns the 3 multimask outputs; False returns one mask per prompt with SAM 2's
        dynamic fallback to the best multimask output when the single mask is unstable.
        """
        ...

    def decode_above(self, features: ImageFeatures, point_coords: np.ndarray, point_labels: np.ndarray,
                     iou_threshold: float) -> DecodedMasks:
        """Multimask decoding whose callers drop every candidate with IoU at or below `iou_threshold`:
        the masks of prompts without a candidate above it may be left at zero (their work skipped)."""
        ...

    def close(self) -> None: ...


class AllTokensEngine:
    """Shared part of backends whose decoder returns every mask token (as our exported graphs do): the
    token selection of `Engine.decode`, `info`, the decoder's feeds and warm-up. Subclasses provide `encode`
    and `decode_all_tokens`, and may override `decode_above` with one that skips work."""

    manifest: Manifest
    providers: list[str]
    backend = "custom"

    @property
    def info(self) -> EngineInfo:
        return EngineInfo(self.backend, tuple(self.providers), self.manifest.weights.trained)

    def encode(self, image: np.ndarray) -> ImageFeatures:
        raise NotImplementedError

    def decode_all_tokens(self, features: ImageFeatures, point_coords: np.ndarray, point_labels: np.ndarray,
                          mask_input: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Logits and IoU of every mask token: [B, T, 256, 256] and [B, T]."""
        raise NotImplementedError

    def decode(self, features: ImageFeatures, point_coords: np.ndarray, point_labels: np.ndarray,
               mask_input: np.ndarray | None = None, multimask: bool = True) -> DecodedMasks:
        masks, iou = self.decode_all_tokens(features, point_coords, point_labels, mask_input)
        return DecodedMasks(*select_tokens(masks, iou, multimask, self.manifest))

    def decode_above(self, features: ImageFeatures, point_coords: np.ndarray, point_labels: np.ndarray,
                     iou_threshold: float) -> DecodedMasks:
        return self.decode(features, point_coords, point_labels, multimask=True)

    def warm_up(self) -> None:
        size = self.manifest.image_size
        features = self.encode(np.zeros((1, 3, size, size), dtype=np.float32))
        self.decode(features, np.full((1, 1, 2), size / 2, np.float32), np.ones((1, 1), np.float32))


def decoder_feeds(features: ImageFeatures, point_coords: np.ndarray, point_labels: np.ndarray,
                  mask_input: np.ndarray | None, low_res_size: int) -> dict[str, np.ndarray]:
    """The decoder graph's inputs (`contract.DECODER_INPUTS`, in order), with the empty mask input when none
    is given. The feature arrays are passed as they are (a backend may recognise them to skip a copy)."""
    batch = point_coords.shape[0]
    if mask_input is None:
        mask_input = np.zeros((batch, 1, low_res_size, low_res_size), np.float32)
        has_mask = np.zeros(1, np.float32)
    else:
        has_mask = np.ones(1, np.float32)
    return {
        "image_embed": features.image_embed,
        "high_res_feats_0": features.high_res_feats_0,
        "high_res_feats_1": features.high_res_feats_1,
        "point_coords": np.ascontiguousarray(point_coords, np.float32),
        "point_labels": np.ascontiguousarray(point_labels, np.float32),
        "mask_input": np.ascontiguousarray(mask_input, np.float32),
        "has_mask_input": has_mask,
    }


PER_PROMPT_INPUTS = ("point_coords", "point_labels", "mask_input")  # batched along the first axis


def warn_if_untrained(directory: Path, manifest: Manifest) -> None:
    """The one log line an engine with untrained weights gets, when it is opened."""
    if not manifest.weights.trained:
        log.warning("UNTRAINED WEIGHTS: engines in %s were exported from randomly initialised %s (seed %s); "
                    "their masks are meaningless", directory, manifest.model, manifest.weights.seed)
