"""A deterministic synthetic mask decoder, injected identically into Meta's predictor and into our engine.

Untrained weights give every prompt the same mask, which exercises none of the generator's filters. This
decoder instead makes image-dependent, diverse logits: each prompt grows a region of similar colour
around its point, with a size per mask token, a sharpness (hence stability) and a predicted IoU that vary
with the prompt's position, plus sparse ±bumps that create small holes and islands. The same numpy
function feeds both generators, so any difference in their masks comes from the generators themselves.
"""

from __future__ import annotations

import numpy as np
import torch

from sam2serve.engines.base import AllTokensEngine, DecodedMasks, ImageFeatures
from sam2serve.engines.manifest import Manifest
from sam2serve.engines.mask_selection import select_multimask

LOW_RES = 256
TOKEN_RADIUS = np.array([0.18, 0.06, 0.16, 0.40], np.float32)  # fraction of the image side
TOKEN_COLOUR_TOLERANCE = np.array([0.9, 0.5, 0.9, 1.6], np.float32)


def low_res_image(model_input: np.ndarray) -> np.ndarray:
    """[1, 3, S, S] normalised image → [3, 256, 256] block means."""
    _, c, s, _ = model_input.shape
    k = s // LOW_RES
    return model_input[0].reshape(c, LOW_RES, k, LOW_RES, k).mean(axis=(2, 4)).astype(np.float32)


def _hash01(x: np.ndarray, y: np.ndarray, salt: float) -> np.ndarray:
    v = np.sin(x.astype(np.float64) * 12.9898 + y.astype(np.float64) * 78.233 + salt) * 43758.5453
    return (v - np.floor(v)).astype(np.float32)


_BUMPS = np.random.default_rng(1234).random((LOW_RES, LOW_RES)) < 0.01


def synthetic_iou(coords: np.ndarray, mask_input: np.ndarray | None) -> np.ndarray:
    """The IoU predictions [B, 4] of `synthetic_decode`: they depend on the prompt only, so a prompt head can
    make them without the logits."""
    x = coords[:, 0, 0] / 4.0
    y = coords[:, 0, 1] / 4.0
    iou = np.stack([0.55 + 0.45 * _hash01(x, y, 10.0 + t) for t in range(4)], axis=1).astype(np.float32)
    if mask_input is not None:  # m2m: more confident
        iou = np.minimum(iou + 0.05, 1.0).astype(np.float32)
    return iou


def synthetic_decode(image: np.ndarray, coords: np.ndarray,
                     mask_input: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """All 4 tokens' logits [B, 4, 256, 256] and IoU [B, 4] for prompts `coords` [B, N, 2] (model frame;
    the first point is used)."""
    b = coords.shape[0]
    x = coords[:, 0, 0] / 4.0
    y = coords[:, 0, 1] / 4.0
    ix = np.clip(x.astype(np.int64), 0, LOW_RES - 1)
    iy = np.clip(y.astype(np.int64), 0, LOW_RES - 1)
    colour = image[:, iy, ix].T  # [B, 3]
    colour_dist = np.sqrt(((image[None] - colour[:, :, None, None]) ** 2).sum(axis=1))  # [B, H, W]
    gy, gx = np.mgrid[0:LOW_RES, 0:LOW_RES].astype(np.float32)
    space_dist = np.sqrt((gx[None] - x[:, None, None]) ** 2 + (gy[None] - y[:, None, None]) ** 2) / LOW_RES
    sharpness = 3.0 + 37.0 * _hash01(x, y, 1.0)  # soft (unstable) to steep (stable) edges
    logits = np.empty((b, 4, LOW_RES, LOW_RES), np.float32)
    for t in range(4):
        score = (TOKEN_COLOUR_TOLERANCE[t] - colour_dist) + 2.0 * (TOKEN_RADIUS[t] - space_dist)
        logits[:, t] = sharpness[:, None, None] * score
    bumps = np.where(_BUMPS, np.float32(6.0), np.float32(0.0)) * np.where(
        _hash01(gx, gy, 3.0) > 0.5, np.float32(1.0), np.float32(-1.0))
    logits += bumps[None, None]
    if mask_input is not None:  # m2m: pull towards the given mask
        logits = 0.5 * logits + 0.5 * mask_input[:, None]
    return logits.astype(np.float32), synthetic_iou(coords, mask_input)


class SyntheticEngine(AllTokensEngine):
    """Our side: an Engine whose encoder keeps the image and whose decoder is `synthetic_decode`, with the same
    split interface as the factored decoder (`decode_above`: IoU of every prompt, logits only for prompts with a
    multimask IoU above the threshold), so that the generator's IoU-first path meets Meta's generator too."""

    can_skip_masks = True

    def __init__(self, manifest: Manifest) -> None:
        self.manifest = manifest
        self.providers = ["synthetic"]
        self._image: np.ndarray | None = None
        self.prompts = 0  # prompts whose IoU was predicted by decode_above
        self.masked_prompts = 0  # of those, prompts whose logits it made

    def encode(self, image: np.ndarray) -> ImageFeatures:
        self._image = low_res_image(image)
        empty = np.zeros((1, 1, 1, 1), np.float32)
        return ImageFeatures(empty, empty, empty)

    def decode_all_tokens(self, features: ImageFeatures, point_coords: np.ndarray, point_labels: np.ndarray,
                          mask_input: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        assert self._image is not None
        return synthetic_decode(self._image, point_coords, None if mask_input is None else mask_input[:, 0])

    def decode_above(self, features: ImageFeatures, point_coords: np.ndarray, point_labels: np.ndarray,
                     iou_threshold: float) -> DecodedMasks:
        assert self._image is not None
        iou = synthetic_iou(point_coords, None)
        masks = np.zeros((len(iou), 4, LOW_RES, LOW_RES), np.float32)
        rows = np.flatnonzero((iou[:, 1:] > iou_threshold).any(axis=1))
        if len(rows):
            masks[rows] = synthetic_decode(self._image, point_coords[rows], None)[0]
        self.prompts += len(iou)
        self.masked_prompts += len(rows)
        return DecodedMasks(*select_multimask(masks, iou))

    def close(self) -> None:
        pass


def inject_synthetic_decoder(model: torch.nn.Module) -> None:
    """Meta's side: replace the encoder call and the prompt/mask decoders of `model` (in place) so that
    SAM2ImagePredictor runs `synthetic_decode`; everything around them stays Meta's code, including the
    token selection `_dynamic_multimask_via_stability`."""
    state: dict[str, np.ndarray] = {}
    decoder = model.sam_mask_decoder
    device = next(model.parameters()).device  # on CUDA, Meta's small-region step runs its CUDA kernel
    sizes = ((decoder.conv_s0.out_channels, 256), (decoder.conv_s1.out_channels, 128),
             (model.sam_prompt_encoder.embed_dim, 64))

    def forward_image(img_batch: torch.Tensor) -> dict[str, list[torch.Tensor]]:
        state["image"] = low_res_image(img_batch.detach().cpu().numpy())
        fpn = [torch.zeros(1, c, s, s, device=device) for c, s in sizes]
        return {"vision_features": fpn[-1], "vision_pos_enc": [torch.zeros_like(f) for f in fpn],
                "backbone_fpn": fpn}

    def prompt_encoder(points, boxes, masks):
        coords = points[0]
        sparse = torch.zeros(coords.shape[0], 2, 4, device=device)
        sparse[:, 0, :2] = coords[:, 0, :]
        sparse[:, 1, 0] = 0.0 if masks is None else 1.0
        return sparse, masks

    def mask_decoder(image_embeddings, image_pe, sparse_prompt_embeddings, dense_prompt_embeddings,
                     multimask_output, repeat_image, high_res_features=None):
        coords = sparse_prompt_embeddings[:, :1, :2].cpu().numpy()
        mask_input = None if dense_prompt_embeddings is None else dense_prompt_embeddings[:, 0].cpu().numpy()
        masks, iou = synthetic_decode(state["image"], coords, mask_input)
        masks_t, iou_t = torch.from_numpy(masks).to(device), torch.from_numpy(iou).to(device)
        if multimask_output:
            return masks_t[:, 1:], iou_t[:, 1:], None, None
        if decoder.dynamic_multimask_via_stability:
            out_masks, out_iou = decoder._dynamic_multimask_via_stability(masks_t, iou_t)
            return out_masks, out_iou, None, None
        return masks_t[:, :1], iou_t[:, :1], None, None

    model.forward_image = forward_image
    model.sam_prompt_encoder.forward = prompt_encoder
    model.sam_mask_decoder.forward = mask_decoder
