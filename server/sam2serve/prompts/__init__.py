"""Prompted segmentation (SAM 2's interactive half): points, boxes and mask refinement on a cached image
embedding. Transport-free: adapters convert their messages to `PromptRequest` and await `PromptWorkers`."""

from .cache import ByteBudgetLRU, CacheObserver
from .model import (
    BoxPrompt,
    EmbeddedImage,
    ImageSource,
    MaskOutputs,
    PointPrompt,
    PredictedMask,
    PromptFields,
    PromptLimits,
    PromptOutcome,
    PromptRequest,
    PromptSetResult,
)
from .segmenter import PromptSegmenter, image_id_of
from .workers import PromptWorkers

__all__ = [
    "BoxPrompt",
    "ByteBudgetLRU",
    "CacheObserver",
    "EmbeddedImage",
    "ImageSource",
    "MaskOutputs",
    "PointPrompt",
    "PredictedMask",
    "PromptFields",
    "PromptLimits",
    "PromptOutcome",
    "PromptRequest",
    "PromptSegmenter",
    "PromptSetResult",
    "PromptWorkers",
    "image_id_of",
]
