"""Prompted segmentation on a cached image embedding: SAM2ImagePredictor's `set_image` + `predict`, as
plain synchronous calls (a transport runs them on worker threads, see `workers.PromptWorkers`).

The embedding of an image is cached under its image_id (SHA-256 of the model and the decoded pixels), the
low-res logits of every returned mask under a logits id, so that the next click costs only the decoder.
"""

from __future__ import annotations

import hashlib
import re
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ..engines.base import DecodedMasks, Engine, ImageFeatures
from ..engines.mask_selection import LOW_RES_CLAMP
from ..errors import EmbeddingNotFound, InvalidInput
from ..inputs import InputLimits, load_image
from ..preprocess import to_model_input
from .cache import ByteBudgetLRU
from .model import EmbeddedImage, ImageSource, PromptLimits, PromptOutcome, PromptRequest, PromptSetResult
from .prepare import decoder_prompts, mask_input
from .render import render_masks
from .validate import check_prompts, check_within_image

IMAGE, MASK = "image", "mask"  # cache entry kinds
_IMAGE_ID = re.compile(r"[0-9a-f]{64}")
_LOGITS_ID = re.compile(r"([0-9a-f]{32})\.(\d+)")


@dataclass(frozen=True)
class CachedEmbedding:
    features: ImageFeatures
    height: int
    width: int
    context_bytes: int = 0  # the factored decoder's context, which lives as long as `features` do

    @property
    def nbytes(self) -> int:
        f = self.features
        return int(f.image_embed.nbytes + f.high_res_feats_0.nbytes + f.high_res_feats_1.nbytes) + self.context_bytes


@dataclass(frozen=True)
class CachedLogits:
    image_id: str
    logits: np.ndarray  # [M, 256, 256], clamped as SAM2ImagePredictor returns them

    @property
    def nbytes(self) -> int:
        return int(self.logits.nbytes)


def model_key(engine: Engine) -> str:
    """What makes embeddings of one picture differ between servers: the model, its weights and, when it is not
    fp32, the encoder's precision (fp32 ids stay as they were)."""
    m = engine.manifest
    weights = m.weights.sha256 or f"seed={m.weights.seed}"
    precision = engine.info.encoder_precision
    return f"{m.model}|{m.weights.origin}|{weights}" + ("" if precision == "fp32" else f"|{precision}")


def image_id_of(rgb: np.ndarray, model: str) -> str:
    """SHA-256 of the model and the decoded HxWx3 pixels (shape included: the same bytes can be two images)."""
    digest = hashlib.sha256(f"sam2serve-image|{model}|{rgb.shape[0]}x{rgb.shape[1]}|".encode())
    digest.update(np.ascontiguousarray(rgb).data)
    return digest.hexdigest()


class PromptSegmenter:
    def __init__(self, engine: Engine, cache: ByteBudgetLRU, input_limits: InputLimits,
                 limits: PromptLimits | None = None) -> None:
        self.engine = engine
        self.cache = cache
        self.input_limits = input_limits
        self.limits = limits or PromptLimits()
        self.model = model_key(engine)

    def embed(self, source: ImageSource) -> EmbeddedImage:
        """The image's embedding in the cache (encoded now unless it was there), and its id."""
        return self._embedding(source)[0]

    def segment(self, request: PromptRequest) -> PromptOutcome:
        check_prompts(request, self.limits)
        refine = self._logits_key(request.mask_input_id) if request.mask_input_id else None
        image, embedding = self._embedding(request.image, lambda w, h: check_within_image(request, w, h))
        previous = self._previous_logits(refine, request.mask_input_id, image.image_id) if refine else None
        hw = (embedding.height, embedding.width)
        timings = dict(image.timings)
        start = time.perf_counter()
        coords, labels = decoder_prompts(request.points, request.boxes, hw, self.engine.manifest.image_size)
        decoded = self._decode(embedding.features, coords, labels,
                               None if previous is None else mask_input(previous, len(coords)), request.multimask)
        timings["decoder"] = time.perf_counter() - start
        results = []
        for row in range(len(coords)):
            key = uuid.uuid4().hex
            logits = decoded.low_res_logits[row]
            self.cache.put(key, MASK, CachedLogits(image.image_id, np.clip(logits, -LOW_RES_CLAMP, LOW_RES_CLAMP)))
            ids = [f"{key}.{k}" for k in range(len(logits))]
            results.append(PromptSetResult(render_masks(
                logits, decoded.iou_predictions[row], hw, self.engine.manifest.mask_threshold, request.outputs,
                ids, f"mask_{row:02d}", timings)))
        return PromptOutcome(image, results, timings)

    def _decode(self, features: ImageFeatures, coords: np.ndarray, labels: np.ndarray,
                mask: np.ndarray | None, multimask: bool) -> DecodedMasks:
        """The one place prompts meet the decoder (a factored decoder can take over here)."""
        return self.engine.decode(features, coords, labels, mask_input=mask, multimask=multimask)

    def _embedding(self, source: ImageSource, check: Callable[[int, int], None] = lambda w, h: None
                   ) -> tuple[EmbeddedImage, CachedEmbedding]:
        """The image and its cached embedding; `check(width, height)` runs before any encoding."""
        start = time.perf_counter()
        if source.kind == "image_id":
            image_id = str(source.value).strip().lower()
            if not _IMAGE_ID.fullmatch(image_id):
                raise InvalidInput(f"image_id must be the 64 hex digits EmbedImage or Segment returned, got "
                                   f"{str(source.value)[:80]!r}")
            cached = self.cache.get(image_id, IMAGE)
            if cached is None:
                raise EmbeddingNotFound(
                    f"image_id {image_id} is not in this replica's embedding cache (never embedded here, or "
                    "evicted): send the image again (image_url, image_data_uri or image_bytes)")
            check(cached.width, cached.height)
            return EmbeddedImage(image_id, cached.width, cached.height, True,
                                 timings={"image": time.perf_counter() - start, "encoder": 0.0}), cached
        loaded = load_image(source.kind, source.value, self.input_limits, source.fetched)
        check(loaded.width, loaded.height)
        image_id = image_id_of(loaded.rgb, self.model)
        image_s = time.perf_counter() - start
        encoder_s = 0.0

        def encode() -> CachedEmbedding:
            nonlocal encoder_s
            began = time.perf_counter()
            m = self.engine.manifest
            features = self.engine.encode(to_model_input(loaded.rgb, m.image_size, m.pixel_mean, m.pixel_std))
            context_bytes = self._context_bytes(features)
            encoder_s = time.perf_counter() - began
            return CachedEmbedding(features, loaded.height, loaded.width, context_bytes)

        embedding, cached = self.cache.get_or_compute(image_id, IMAGE, encode)
        return EmbeddedImage(image_id, loaded.width, loaded.height, cached, loaded.rgb,
                             {"image": image_s, "encoder": encoder_s}), embedding

    def _context_bytes(self, features: ImageFeatures) -> int:
        """With a factored decoder, its context of `features` (≈ 45 MB, kept while they live), made now so that
        the cache's budget counts it."""
        factored = getattr(self.engine, "factored", None)
        if factored is None:
            return 0
        return sum(int(tensor.nbytes) for tensor in factored.context(features).values())

    @staticmethod
    def _logits_key(logits_id: str) -> tuple[str, int]:
        found = _LOGITS_ID.fullmatch(logits_id.strip().lower())
        if found is None:
            raise InvalidInput(f"mask_input_id must be a logits_id an earlier Segment call returned, got "
                               f"{logits_id[:80]!r}")
        return found.group(1), int(found.group(2))

    def _previous_logits(self, key: tuple[str, int], logits_id: str, image_id: str) -> np.ndarray:
        cached = self.cache.get(key[0], MASK)
        if cached is None:
            raise EmbeddingNotFound(
                f"mask_input_id {logits_id} is not in this replica's cache (made on another replica, or evicted): "
                "segment again without mask_input_id, or send the earlier prompts again")
        if cached.image_id != image_id:
            raise InvalidInput(f"mask_input_id {logits_id} belongs to another image ({cached.image_id}), not "
                               f"{image_id}")
        if key[1] >= len(cached.logits):
            raise InvalidInput(f"mask_input_id {logits_id}: that call returned {len(cached.logits)} masks")
        return cached.logits[key[1]]
