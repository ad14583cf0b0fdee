"""SAM 2 automatic mask generation over an `Engine`: Meta's algorithm, without its wasted work.

Same grid, crops, filters and NMS as `SAM2AutomaticMaskGenerator`, but candidates are filtered by
predicted IoU before anything is upsampled, each survivor is upsampled at most once (stability and box
from the same map, and not even that where the low-res logits decide them), and full-resolution masks
and RLEs are made only for the masks that survive NMS. When no stability threshold filters, stability is
computed only for the masks that survive NMS, from the same upsampling as their RLE. Candidates waiting for
NMS hold their logits compactly (`CompactLogits`), exact wherever a threshold decision depends on them.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np

from ..domain import UNSUPERVISED, Cancelled, GenerationResult, JobControl, MaskRecord
from ..engines.base import Engine, ImageFeatures
from ..engines.mask_selection import LOW_RES_CLAMP
from ..preprocess import to_model_coords, to_model_input
from .compact import CompactLogits
from .grids import build_all_layer_point_grids, generate_crop_boxes
from .masks import (
    fill_holes_and_remove_sprinkles,
    is_box_near_crop_edge,
    mask_to_box,
    remove_small_regions,
    stability_score,
    upsample_logits,
    upsampled_box,
    upsampled_stability_and_box,
)
from .nms import nms
from .params import GeneratorParams
from .rle import encode_rle, rle_area

DEFAULT_MAX_DECODER_BATCH = 8  # ORT CPU decoder: ≈ 80 MB per prompt in a batch; 8 keeps peak RSS ≈ 2 GB


@dataclass
class _Kept:
    """Survivors of the per-candidate filters within one crop."""

    low_res: list[CompactLogits] = field(default_factory=list)
    iou: list[float] = field(default_factory=list)
    stability: list[float | None] = field(default_factory=list)  # None: computed after NMS
    boxes: list[np.ndarray] = field(default_factory=list)
    points: list[np.ndarray] = field(default_factory=list)


@dataclass
class _Survivor:
    low_res: CompactLogits
    iou: float
    stability: float | None  # None: computed with the mask
    box: np.ndarray  # XYXY, image frame
    point: np.ndarray  # image frame
    crop_box: list[int]  # XYXY


@dataclass
class _Run:
    """One `generate` call: its image, parameters and control, and what it has counted and timed so far."""

    image: np.ndarray
    p: GeneratorParams
    control: JobControl
    orig_hw: tuple[int, int]
    total: int  # prompts to decode
    done: int = 0
    timings: dict[str, float] = field(
        default_factory=lambda: {"encoder": 0.0, "decoder": 0.0, "postprocess": 0.0, "encoding": 0.0})
    counts: dict[str, int] = field(default_factory=lambda: {
        "candidates": 0, "after_iou": 0, "after_stability": 0, "after_crop_edge": 0, "after_box_nms": 0,
        "after_crop_nms": 0, "low_res_cleaned": 0})

    @contextmanager
    def timed(self, stage: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.timings[stage] += time.perf_counter() - start

    def advance(self, prompts: int) -> None:
        self.done += prompts
        self.control.progress(self.done, self.total)


@dataclass(frozen=True)
class _Crop:
    box: list[int]  # XYXY in the image
    hw: tuple[int, int]
    features: ImageFeatures


class AutoMaskGenerator:
    def __init__(self, engine: Engine, max_decoder_batch: int = DEFAULT_MAX_DECODER_BATCH) -> None:
        self.engine = engine
        self.max_decoder_batch = max(1, max_decoder_batch)

    def generate(self, image: np.ndarray, params: GeneratorParams | None = None,
                 control: JobControl = UNSUPERVISED) -> GenerationResult:
        """Masks for an HxWx3 uint8 RGB image. Progress counts decoded prompts; `control.should_stop()` is
        asked before every decoder batch (`Cancelled` when it says so)."""
        p = params or GeneratorParams()
        orig_hw = (int(image.shape[0]), int(image.shape[1]))
        if p.point_grids is not None:
            grids = list(p.point_grids)
        else:
            assert p.points_per_side is not None  # GeneratorParams holds exactly one of the two
            grids = build_all_layer_point_grids(p.points_per_side, p.crop_n_layers, p.crop_n_points_downscale_factor)
        crop_boxes, layers = generate_crop_boxes(orig_hw, p.crop_n_layers, p.crop_overlap_ratio)
        run = _Run(image, p, control, orig_hw, total=sum(len(grids[layer]) for layer in layers))

        survivors: list[_Survivor] = []
        for crop_box, layer in zip(crop_boxes, layers, strict=True):
            survivors += self._process_crop(run, crop_box, grids[layer])
        with run.timed("postprocess"):
            if len(crop_boxes) > 1 and survivors:
                areas = np.array([(c[2] - c[0]) * (c[3] - c[1]) for c in (s.crop_box for s in survivors)])
                scores = np.float32(1.0) / areas.astype(np.float32)
                keep = nms(np.stack([s.box for s in survivors]).astype(np.float32), scores, p.crop_nms_thresh)
                survivors = [survivors[i] for i in keep]
            run.counts["after_crop_nms"] = len(survivors)

        with run.timed("encoding"):
            records = [self._record(run, s) for s in survivors]
            if p.output_min_region_area > 0:
                records = postprocess_small_regions(records, p.output_min_region_area, p.box_nms_thresh)
            run.counts["final"] = len(records)
        return GenerationResult(records, orig_hw, run.timings, run.counts)

    def _process_crop(self, run: _Run, crop_box: list[int], grid: np.ndarray) -> list[_Survivor]:
        m, p = self.engine.manifest, run.p
        x0, y0, x1, y1 = crop_box
        image = run.image[y0:y1, x0:x1]
        crop_hw = (int(image.shape[0]), int(image.shape[1]))
        with run.timed("encoder"):
            crop = _Crop(crop_box, crop_hw, self.engine.encode(to_model_input(image, m.image_size, m.pixel_mean,
                                                                              m.pixel_std)))

        points = (grid * np.array(crop_hw)[None, ::-1]).astype(np.float32)
        kept = _Kept()
        batch = min(p.points_per_batch, self.max_decoder_batch)
        for first in range(0, len(points), batch):
            if run.control.should_stop():
                raise Cancelled
            pts = points[first:first + batch]
            with run.timed("decoder"):
                logits, iou, cand_points = self._decode_batch(run, crop, pts)
            with run.timed("postprocess"):
                self._filter_candidates(run, crop, logits, iou, cand_points, kept)
            run.advance(len(pts))

        with run.timed("postprocess"):
            result: list[_Survivor] = []
            if kept.iou:
                boxes = np.stack(kept.boxes)
                keep = nms(boxes.astype(np.float32), np.asarray(kept.iou, np.float32), p.box_nms_thresh)
                offset = np.array([x0, y0, x0, y0])
                for i in keep:
                    result.append(_Survivor(kept.low_res[i], kept.iou[i], kept.stability[i], boxes[i] + offset,
                                            kept.points[i] + np.array([x0, y0], np.float32), crop_box))
            run.counts["after_box_nms"] += len(result)
        return result

    def _decode_batch(self, run: _Run, crop: _Crop,
                      pts: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Candidate logits [K, 256, 256], IoU [K] and prompt points [K, 2] for a batch of grid points."""
        engine, p = self.engine, run.p
        coords = to_model_coords(pts, crop.hw, engine.manifest.image_size)[:, None, :]
        labels = np.ones((len(pts), 1), np.float32)
        if p.multimask_output and not p.use_m2m and p.pred_iou_thresh > 0.0:
            # Candidates at or below the IoU threshold are dropped before their logits are read, so prompts
            # without a single candidate above it need no masks (engines that can, skip their mask head).
            out = engine.decode_above(crop.features, coords, labels, p.pred_iou_thresh)
        else:
            out = engine.decode(crop.features, coords, labels, multimask=p.multimask_output)
        per_prompt = out.low_res_logits.shape[1]
        logits = out.low_res_logits.reshape(-1, *out.low_res_logits.shape[2:])
        iou = out.iou_predictions.reshape(-1)
        cand_points = np.repeat(pts, per_prompt, axis=0)
        if p.use_m2m:
            logits, iou = self._refine_with_m2m(run, crop, cand_points, logits)
        return logits, iou, cand_points

    def _refine_with_m2m(self, run: _Run, crop: _Crop, points: np.ndarray,
                         logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """One more decoder pass per candidate with its own low-res logits as mask input, single mask."""
        size = self.engine.manifest.image_size
        masks, ious = [], []
        batch = min(run.p.points_per_batch, self.max_decoder_batch)
        for first in range(0, len(points), batch):
            pts = points[first:first + batch]
            out = self.engine.decode(
                crop.features, to_model_coords(pts, crop.hw, size)[:, None, :],
                np.ones((len(pts), 1), np.float32),
                mask_input=np.clip(logits[first:first + batch], -LOW_RES_CLAMP, LOW_RES_CLAMP)[:, None],
                multimask=False,
            )
            masks.append(out.low_res_logits[:, 0])
            ious.append(out.iou_predictions[:, 0])
        return np.concatenate(masks), np.concatenate(ious)

    def _filter_candidates(self, run: _Run, crop: _Crop, logits: np.ndarray, iou: np.ndarray,
                           points: np.ndarray, kept: _Kept) -> None:
        p, counts = run.p, run.counts
        t_low, t_high = p.mask_threshold - p.stability_score_offset, p.mask_threshold + p.stability_score_offset
        # Without a stability threshold, stability changes nothing before NMS: only survivors need it, and their
        # logits are then kept exact at threshold ± offset as well.
        defer_stability = not p.stability_score_thresh > 0.0
        thresholds = (t_low, p.mask_threshold, t_high) if defer_stability else (p.mask_threshold,)
        counts["candidates"] += len(iou)
        order = np.flatnonzero(iou > p.pred_iou_thresh) if p.pred_iou_thresh > 0.0 else np.arange(len(iou))
        counts["after_iou"] += len(order)
        batch_boxes, batch_index = [], []
        for i in order:
            low_res, cleaned = fill_holes_and_remove_sprinkles(logits[i], p.min_mask_region_area, p.mask_threshold)
            counts["low_res_cleaned"] += cleaned
            stability: float | None = None
            if defer_stability:
                box = upsampled_box(low_res, crop.hw, p.mask_threshold)
            else:
                measured, box = upsampled_stability_and_box(low_res, crop.hw, p.mask_threshold,
                                                            p.stability_score_offset)
                if not measured >= p.stability_score_thresh:
                    continue
                stability = float(measured)
            batch_boxes.append(box)
            batch_index.append((i, low_res, stability))
        counts["after_stability"] += len(batch_boxes)
        if not batch_boxes:
            return
        near_edge = is_box_near_crop_edge(np.stack(batch_boxes), crop.box, [0, 0, run.orig_hw[1], run.orig_hw[0]])
        for (i, low_res, score), box, drop in zip(batch_index, batch_boxes, near_edge, strict=True):
            if drop:
                continue
            kept.low_res.append(CompactLogits.encode(low_res, thresholds))  # never a view of the decoder batch
            kept.iou.append(float(iou[i]))
            kept.stability.append(score)
            kept.boxes.append(box)
            kept.points.append(points[i])
        counts["after_crop_edge"] += int(np.count_nonzero(~near_edge))

    def _record(self, run: _Run, s: _Survivor) -> MaskRecord:
        x0, y0, x1, y1 = s.crop_box
        p = run.p
        up = upsample_logits(s.low_res.decode(), (y1 - y0, x1 - x0))
        stability = s.stability
        if stability is None:
            stability = float(stability_score(up, p.mask_threshold, p.stability_score_offset))
        if (y1 - y0, x1 - x0) == run.orig_hw:
            full = up > p.mask_threshold
        else:
            full = np.zeros(run.orig_hw, dtype=bool)
            full[y0:y1, x0:x1] = up > p.mask_threshold
        del up
        rle = encode_rle(full)
        bx0, by0, bx1, by1 = (int(v) for v in s.box)
        return MaskRecord(
            rle=rle,
            area=rle_area(rle),
            bbox=[bx0, by0, bx1 - bx0, by1 - by0],
            predicted_iou=s.iou,
            stability_score=stability,
            point_coords=[[float(s.point[0]), float(s.point[1])]],
            crop_box=[x0, y0, x1 - x0, y1 - y0],
        )


def postprocess_small_regions(records: list[MaskRecord], min_area: int, nms_thresh: float) -> list[MaskRecord]:
    """SAM 1's cleanup at output resolution: remove holes and islands below `min_area`, then box NMS that
    prefers masks the cleanup left unchanged (Meta's `postprocess_small_regions`)."""
    if not records:
        return records
    masks, scores = [], []
    for record in records:
        mask, holes_changed = remove_small_regions(record.mask(), min_area, mode="holes")
        mask, islands_changed = remove_small_regions(mask, min_area, mode="islands")
        masks.append(mask)
        scores.append(0.0 if holes_changed or islands_changed else 1.0)
    boxes = np.stack([mask_to_box(mk) for mk in masks]).astype(np.float32)
    out = []
    for i in nms(boxes, np.asarray(scores, np.float32), nms_thresh):
        record = records[i]
        if scores[i] == 0.0:
            rle = encode_rle(masks[i])
            x0, y0, x1, y1 = (int(v) for v in boxes[i])
            record = MaskRecord(rle, rle_area(rle), [x0, y0, x1 - x0, y1 - y0], record.predicted_iou,
                                record.stability_score, record.point_coords, record.crop_box)
        out.append(record)
    return out
