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


# What build_sam2 adds to every config when it builds a model for the predictors (apply_postprocessing=True).
PREDICTOR_DECODER_OVERRIDES = [
    "++model.sam_mask_decoder_extra_args.dynamic_multimask_via_stability=true",
    "++model.sam_mask_decoder_extra_args.dynamic_multimask_stability_delta=0.05",
    "++model.sam_mask_decoder_extra_args.dynamic_multimask_stability_thresh=0.98",
]
_HEAD_SETTINGS = ("image_size", "backbone_stride", "use_high_res_features_in_sam", "iou_prediction_use_sigmoid",
                  "pred_obj_scores", "pred_obj_scores_mlp", "use_multimask_token_for_obj_ptr",
                  "sam_mask_decoder_extra_args", "use_obj_ptrs_in_encoder", "use_mlp_for_obj_ptr_proj",
                  "proj_tpos_enc_in_obj_ptrs")


def build_untrained_decoder(spec: ModelSpec, seed: int) -> torch.nn.Module:
    """Only Meta's prompt encoder and mask decoder of `spec`, randomly initialised: `SAM2Base._build_sam_heads`
    run with the model config's settings (and the predictor's overrides) on a module without the image encoder
    or memory. A cheap stand-in for decoder tests of every model size."""
    import inspect

    from hydra import compose
    from omegaconf import OmegaConf
    from sam2.modeling.sam2_base import SAM2Base

    cfg = compose(config_name=spec.config, overrides=PREDICTOR_DECODER_OVERRIDES).model
    defaults = {k: p.default for k, p in inspect.signature(SAM2Base.__init__).parameters.items()}
    heads = torch.nn.Module()
    heads.hidden_dim = int(cfg.image_encoder.neck.d_model)
    heads.mem_dim = int(cfg.memory_encoder.out_dim)
    for key in _HEAD_SETTINGS:
        value = cfg.get(key, defaults[key])
        setattr(heads, key, OmegaConf.to_container(value) if OmegaConf.is_config(value) else value)
    torch.manual_seed(seed)
    SAM2Base._build_sam_heads(heads)
    return heads.eval()
