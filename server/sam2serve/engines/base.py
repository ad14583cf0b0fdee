"""The one small interface every engine backend (ONNX Runtime, TensorRT) implements."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

from .manifest import Manifest
from .mask_selection import select_tokens


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


class Engine(Protocol):
    manifest: Manifest
    providers: list[str]

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

    def close(self) -> None: ...


class AllTokensEngine:
    """Shared part of backends whose decoder returns every mask token (as our exported graphs do): the
    token selection of `Engine.decode` and warm-up. Subclasses provide `encode` and `decode_all_tokens`."""

    manifest: Manifest

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

    def warm_up(self) -> None:
        size = self.manifest.image_size
        features = self.encode(np.zeros((1, 3, size, size), dtype=np.float32))
        self.decode(features, np.full((1, 1, 2), size / 2, np.float32), np.ones((1, 1), np.float32))
