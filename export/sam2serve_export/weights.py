"""Where the weights come from: a local official checkpoint, Meta's download host, or a seeded random init."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from sam2serve.engines.manifest import Weights, sha256_file

from .checkpoint import build_model, build_untrained_model, load_official_checkpoint
from .download import download_checkpoint
from .models import ModelSpec


@dataclass(frozen=True)
class WeightsChoice:
    checkpoint: Path | None = None
    download: bool = False
    base_url: str | None = None
    cache_dir: Path = Path("checkpoints")
    untrained_seed: int | None = None

    def describe(self) -> str:
        if self.checkpoint:
            return f"checkpoint {self.checkpoint}"
        if self.download:
            return f"official checkpoint from {self.base_url or 'Meta'}"
        return f"UNTRAINED random weights (seed {self.untrained_seed})"


def load_model(spec: ModelSpec, choice: WeightsChoice, progress: bool = True) -> tuple[torch.nn.Module, Weights]:
    if choice.untrained_seed is not None:
        return build_untrained_model(spec, choice.untrained_seed), Weights("untrained", seed=choice.untrained_seed)
    if choice.download:
        path = download_checkpoint(spec, choice.cache_dir, base_url=choice.base_url, progress=progress)
        origin, source = "download", spec.url(choice.base_url)
    elif choice.checkpoint is not None:
        path, origin, source = choice.checkpoint, "checkpoint", choice.checkpoint.name
    else:
        raise ValueError("choose weights: a checkpoint, a download, or untrained with a seed")
    model = build_model(spec)
    load_official_checkpoint(model, spec, path)
    return model, Weights(origin, sha256=sha256_file(path), source=source)
