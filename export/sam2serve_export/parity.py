"""Compare our generator's masks with Meta's: pair masks by IoU, count, and measure metadata drift."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils

from sam2serve.amg.generator import MaskRecord

MATCH_IOU = 0.5


@dataclass(frozen=True)
class ParityReport:
    reference_masks: int
    our_masks: int
    matched: int
    mean_iou: float  # over matched pairs (1.0 when both sides are empty)
    min_iou: float
    unmatched_reference: int
    unmatched_ours: int
    max_delta_predicted_iou: float
    max_delta_stability: float
    max_delta_bbox: float
    same_order: bool  # pair i of ours is record i of the reference, for every i

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _coco(rle: dict[str, Any]) -> dict[str, Any]:
    counts = rle["counts"]
    return {"size": list(rle["size"]), "counts": counts.encode("ascii") if isinstance(counts, str) else counts}


def compare_masks(reference: list[dict[str, Any]], ours: list[MaskRecord]) -> ParityReport:
    if not reference or not ours:
        empty = not reference and not ours
        return ParityReport(len(reference), len(ours), 0, 1.0 if empty else 0.0, 1.0 if empty else 0.0,
                            len(reference), len(ours), 0.0, 0.0, 0.0, empty)
    ref_rles = [_coco(r["segmentation"]) for r in reference]
    our_rles = [_coco(r.rle) for r in ours]
    iou = np.asarray(mask_utils.iou(our_rles, ref_rles, [0] * len(ref_rles)))  # [ours, ref]
    pairs: list[tuple[int, int, float]] = []
    used_ours, used_ref = set(), set()
    for flat in np.argsort(-iou, axis=None, kind="stable"):
        i, j = np.unravel_index(flat, iou.shape)
        if iou[i, j] < MATCH_IOU:
            break
        if i in used_ours or j in used_ref:
            continue
        used_ours.add(i)
        used_ref.add(j)
        pairs.append((int(i), int(j), float(iou[i, j])))
    ious = [p[2] for p in pairs]

    def max_delta(get_ours: Any, get_ref: Any) -> float:
        return max((float(np.max(np.abs(np.subtract(get_ours(ours[i]), get_ref(reference[j]), dtype=float))))
                    for i, j, _ in pairs), default=0.0)

    return ParityReport(
        reference_masks=len(reference),
        our_masks=len(ours),
        matched=len(pairs),
        mean_iou=float(np.mean(ious)) if ious else 0.0,
        min_iou=float(np.min(ious)) if ious else 0.0,
        unmatched_reference=len(reference) - len(pairs),
        unmatched_ours=len(ours) - len(pairs),
        max_delta_predicted_iou=max_delta(lambda r: r.predicted_iou, lambda r: r["predicted_iou"]),
        max_delta_stability=max_delta(lambda r: r.stability_score, lambda r: r["stability_score"]),
        max_delta_bbox=max_delta(lambda r: r.bbox, lambda r: r["bbox"]),
        same_order=len(ours) == len(reference) and all(i == j for i, j, _ in pairs) and len(pairs) == len(ours),
    )


def format_report(label: str, report: ParityReport) -> str:
    r = report
    return (f"{label:32} ref {r.reference_masks:4d}  ours {r.our_masks:4d}  matched {r.matched:4d}  "
            f"mIoU {r.mean_iou:.5f} (min {r.min_iou:.4f})  unmatched {r.unmatched_reference}/{r.unmatched_ours}  "
            f"Δiou {r.max_delta_predicted_iou:.1e}  Δstab {r.max_delta_stability:.1e}  Δbbox {r.max_delta_bbox:.0f}  "
            f"order {'same' if r.same_order else 'differs'}")
