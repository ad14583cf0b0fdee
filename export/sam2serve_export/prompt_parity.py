"""Meta's `SAM2ImagePredictor.predict` (its own prompt preparation, box labels, padding, mask selection and
logits clamp) against our prompt data plane (`sam2serve.prompts`: image decoding, preprocessing, engines,
cache, prompt preparation, mask selection, rendering), prompt set by prompt set."""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
import torch

from sam2serve.engines.base import Engine
from sam2serve.inputs import InputLimits
from sam2serve.prompts import (
    BoxPrompt,
    ByteBudgetLRU,
    ImageSource,
    MaskOutputs,
    PointPrompt,
    PromptRequest,
    PromptSegmenter,
)
from sam2serve.prompts.segmenter import MASK

from .errors import ParityError
from .verify import ParityRow, compare


@dataclass(frozen=True)
class PromptCase:
    """Prompts in fractions of the image's width and height, so that one case fits any image."""

    name: str
    points: tuple[tuple[float, float, int], ...] = ()  # x, y, label
    boxes: tuple[tuple[float, float, float, float], ...] = ()
    refine: bool = False  # mask input: the best mask of "single point" (multimask)


CASES = (
    PromptCase("single point", points=((0.28, 0.31, 1),)),
    PromptCase("points + background", points=((0.28, 0.31, 1), (0.62, 0.52, 1), (0.78, 0.25, 0))),
    PromptCase("box", boxes=((0.24, 0.50, 0.39, 0.73),)),
    PromptCase("box + points", boxes=((0.24, 0.50, 0.39, 0.73),), points=((0.32, 0.62, 1), (0.30, 0.70, 0))),
    PromptCase("two boxes + point", boxes=((0.24, 0.50, 0.39, 0.73), (0.55, 0.15, 0.95, 0.60)),
               points=((0.5, 0.5, 1),)),
    PromptCase("refine: points + mask", points=((0.28, 0.31, 1), (0.62, 0.52, 1), (0.78, 0.25, 0)), refine=True),
)
REFINED_FROM = CASES[0]


@dataclass
class Predicted:
    low_res: np.ndarray  # [B, M, 256, 256], clamped as the predictor returns them
    scores: np.ndarray  # [B, M]
    masks: np.ndarray  # [B, M, H, W] bool
    logits_ids: list[list[str]] | None = None  # ours: what refines each mask


def _pixels(case: PromptCase, w: int, h: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    points = np.array([[x * w, y * h] for x, y, _ in case.points], np.float32).reshape(-1, 2)
    labels = np.array([label for *_, label in case.points], np.int32)
    boxes = np.array([[x0 * w, y0 * h, x1 * w, y1 * h] for x0, y0, x1, y1 in case.boxes], np.float32).reshape(-1, 4)
    return points, labels, boxes


def meta_predict(predictor: object, case: PromptCase, multimask: bool, mask_input: np.ndarray | None) -> Predicted:
    h, w = predictor._orig_hw[-1]  # type: ignore[attr-defined]
    points, labels, boxes = _pixels(case, w, h)
    rows = max(1, len(boxes))
    kwargs: dict[str, object] = {}
    if len(points):  # several boxes take the points batched, one copy per box (as ours share them)
        kwargs["point_coords"] = points if rows == 1 else np.repeat(points[None], rows, axis=0)
        kwargs["point_labels"] = labels if rows == 1 else np.repeat(labels[None], rows, axis=0)
    if len(boxes):
        kwargs["box"] = boxes[0] if rows == 1 else boxes
    with torch.no_grad():
        masks, scores, low_res = predictor.predict(  # type: ignore[attr-defined]
            mask_input=mask_input, multimask_output=multimask, return_logits=True, **kwargs)
    if rows == 1:
        masks, scores, low_res = masks[None], scores[None], low_res[None]
    return Predicted(low_res, scores, masks > predictor.mask_threshold)  # type: ignore[attr-defined]


def our_predict(segmenter: PromptSegmenter, image_id: str, case: PromptCase, multimask: bool,
                mask_input_id: str) -> Predicted:
    cached = segmenter.cache.get(image_id, "image")
    assert cached is not None
    points, labels, boxes = _pixels(case, cached.width, cached.height)
    request = PromptRequest(
        ImageSource("image_id", image_id),
        points=tuple(PointPrompt(float(x), float(y), int(label)) for (x, y), label in zip(points, labels, strict=True)),
        boxes=tuple(BoxPrompt(*(float(v) for v in b)) for b in boxes),
        mask_input_id=mask_input_id, multimask=multimask, outputs=MaskOutputs(images=False))
    outcome = segmenter.segment(request)
    low_res = np.stack([np.stack([_logits(segmenter, m.logits_id) for m in r.masks]) for r in outcome.results])
    scores = np.array([[m.score for m in r.masks] for r in outcome.results], np.float32)
    masks = np.stack([np.stack([m.mask() for m in r.masks]) for r in outcome.results])
    return Predicted(low_res, scores, masks, [[m.logits_id for m in r.masks] for r in outcome.results])


def _logits(segmenter: PromptSegmenter, logits_id: str) -> np.ndarray:
    key, index = logits_id.split(".")
    cached = segmenter.cache.get(key, MASK)
    assert cached is not None
    return cached.logits[int(index)]


def compare_predictions(case: str, ref: Predicted, ours: Predicted) -> list[ParityRow]:
    """Rows for the low-res logits and the scores, and one whose `relative` is the fraction of full-resolution
    mask pixels that differ. A different mask choice (best score) raises at once."""
    choice_ref, choice_ours = ref.scores.argmax(axis=1), ours.scores.argmax(axis=1)
    if ref.scores.shape != ours.scores.shape or not np.array_equal(choice_ref, choice_ours):
        raise ParityError(f"predict {case}: masks {choice_ours.tolist()} scored best, Meta's predictor chose "
                          f"{choice_ref.tolist()} (scores {ours.scores.tolist()} vs {ref.scores.tolist()})")
    rows = compare("predict", case, ("low_res_logits", "scores"), [ref.low_res, ref.scores],
                   [ours.low_res, ours.scores], ("low_res_logits",))
    differing = float(np.mean(ref.masks != ours.masks))
    rows.append(ParityRow("predict", case, "masks (full res)", differing, differing, differing))
    return rows


class PromptParity:
    """Meta's `predictor` (a SAM2ImagePredictor with `image` set) and our segmenter on `engine`, which gets
    `image` encoded (PNG, lossless) as a client would send it; `rows` compares them case by case."""

    def __init__(self, predictor: object, engine: Engine, image: np.ndarray) -> None:
        self.predictor = predictor
        self.segmenter = PromptSegmenter(engine, ByteBudgetLRU(1 << 40), InputLimits(max_pixels=250_000_000))
        ok, png = cv2.imencode(".png", cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
        assert ok
        self.image_id = self.segmenter.embed(ImageSource("bytes", png.tobytes())).image_id

    def rows(self, label: str, cases: tuple[PromptCase, ...] = CASES) -> list[ParityRow]:
        """Every case with multimask on and off. Refinement starts from each side's own best mask of
        `REFINED_FROM`, predicted anew (so that whatever each side stores for refinement is what it uses)."""
        predictor, segmenter, image_id = self.predictor, self.segmenter, self.image_id
        ref_first = meta_predict(predictor, REFINED_FROM, True, None)
        ours_first = our_predict(segmenter, image_id, REFINED_FROM, True, "")
        best = int(ref_first.scores[0].argmax())
        assert ours_first.logits_ids is not None
        best_id = ours_first.logits_ids[0][best]
        rows: list[ParityRow] = []
        for case in cases:
            for multimask in (True, False):
                mask = ref_first.low_res[0, best][None] if case.refine else None
                ref = meta_predict(predictor, case, multimask, mask)
                ours = our_predict(segmenter, image_id, case, multimask, best_id if case.refine else "")
                mode = "multimask" if multimask else "single"
                rows += compare_predictions(f"{label}: {case.name}, {mode}", ref, ours)
        return rows


def prompt_parity(predictor: object, engine: Engine, image: np.ndarray, label: str,
                  cases: tuple[PromptCase, ...] = CASES) -> list[ParityRow]:
    return PromptParity(predictor, engine, image).rows(label, cases)
