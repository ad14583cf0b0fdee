"""Build SAM 2 models with Meta's code and load weights in the official checkpoint format.

The official format is `torch.save({"model": state_dict})`. Untrained models are the real architecture
initialised from a seeded RNG: deterministic, offline, and useless for segmentation.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from .errors import CheckpointError
from .models import ModelSpec


def build_model(spec: ModelSpec) -> torch.nn.Module:
    """Meta's `build_sam2` on CPU in eval mode, with the same post-processing overrides the predictor uses."""
    from sam2.build_sam import build_sam2

    return build_sam2(spec.config, ckpt_path=None, device="cpu", mode="eval")


def build_untrained_model(spec: ModelSpec, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model(spec)


def save_official_checkpoint(model: torch.nn.Module, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": model.state_dict()}, path)


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path} does not exist") from None
    except Exception as e:
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint: {e}") from None
    if not isinstance(payload, dict) or not isinstance(payload.get("model"), dict):
        keys = list(payload)[:5] if isinstance(payload, dict) else type(payload).__name__
        raise CheckpointError(
            f"{path} is not in the official SAM 2 format {{'model': state_dict}} (found {keys})"
        )
    return payload["model"]


def load_official_checkpoint(model: torch.nn.Module, spec: ModelSpec, path: Path) -> None:
    """Strictly load `path` into `model`, explaining a wrong model/checkpoint pair in words."""
    state = read_state_dict(path)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = sorted(
        k for k in set(expected) & set(state) if tuple(expected[k].shape) != tuple(state[k].shape)
    )
    if missing or unexpected or mismatched:
        found = describe_state_dict(state)
        wanted = describe_state_dict(expected)
        examples = (missing + unexpected + mismatched)[:3]
        raise CheckpointError(
            f"{path} does not fit model {spec.name}: {len(missing)} missing, {len(unexpected)} unexpected "
            f"and {len(mismatched)} wrongly shaped tensors (e.g. {', '.join(examples)}). The file is {found}; "
            f"{spec.name} is {wanted}. Pass the matching --model."
        )
    model.load_state_dict(state, strict=True)


def describe_state_dict(state: dict[str, torch.Tensor]) -> str:
    """A short human description of a SAM 2 checkpoint's architecture, to explain mismatches."""
    blocks = {int(m.group(1)) for k in state if (m := re.match(r"image_encoder\.trunk\.blocks\.(\d+)\.", k))}
    patch = state.get("image_encoder.trunk.patch_embed.proj.weight")
    if not blocks or patch is None:
        return "not a SAM 2 image model"
    version = "SAM 2.1" if "no_obj_embed_spatial" in state else "SAM 2.0"
    return f"a {version} checkpoint with {len(blocks)} Hiera blocks of width {patch.shape[0]}"
