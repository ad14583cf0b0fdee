"""Shared pieces of `sam2serve parity` and `sam2serve bench`: generator flags, the torch twin of an
engine directory."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from sam2serve.amg.params import GeneratorParams, fal_defaults
from sam2serve.engines.manifest import Manifest, sha256_file

from .checkpoint import build_model, build_untrained_model, load_official_checkpoint
from .errors import CheckpointError
from .models import get_model_spec

PARAM_FLAGS: dict[str, type] = {
    "points_per_side": int,
    "points_per_batch": int,
    "pred_iou_thresh": float,
    "stability_score_thresh": float,
    "stability_score_offset": float,
    "mask_threshold": float,
    "box_nms_thresh": float,
    "crop_n_layers": int,
    "crop_nms_thresh": float,
    "crop_overlap_ratio": float,
    "crop_n_points_downscale_factor": int,
    "min_mask_region_area": int,
}


def add_generator_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("generator parameters (Meta's defaults unless --preset fal)")
    g.add_argument("--preset", choices=["meta", "fal"], default="meta")
    for name, kind in PARAM_FLAGS.items():
        g.add_argument(f"--{name.replace('_', '-')}", type=kind, dest=name)
    g.add_argument("--use-m2m", action="store_true")
    g.add_argument("--single-mask", action="store_true", help="multimask_output=False")


def params_from_args(args: argparse.Namespace) -> GeneratorParams:
    base = fal_defaults() if args.preset == "fal" else GeneratorParams()
    overrides = {name: getattr(args, name) for name in PARAM_FLAGS if getattr(args, name) is not None}
    if args.use_m2m:
        overrides["use_m2m"] = True
    if args.single_mask:
        overrides["multimask_output"] = False
    return GeneratorParams(**{**base.__dict__, **overrides})


def torch_model_for(manifest: Manifest, checkpoint: Path | None, cache_dir: Path) -> torch.nn.Module:
    """The torch model whose weights the engines were exported from (verified by SHA-256)."""
    spec = get_model_spec(manifest.model)
    weights = manifest.weights
    if not weights.trained:
        return build_untrained_model(spec, int(weights.seed or 0))
    path = checkpoint or cache_dir / spec.filename
    if not path.is_file():
        raise CheckpointError(f"the engines were exported from {weights.source}; pass --checkpoint with that file")
    if sha256_file(path) != weights.sha256:
        raise CheckpointError(f"{path} is not the checkpoint these engines came from (SHA-256 differs)")
    model = build_model(spec)
    load_official_checkpoint(model, spec, path)
    return model
