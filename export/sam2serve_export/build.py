"""Export one model's engines into a directory, atomically, with a manifest that describes them."""

from __future__ import annotations

import datetime as dt
import importlib.metadata
import logging
import secrets
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import torch
from tqdm import tqdm

from sam2serve.engines.contract import FACTORED_ROLES
from sam2serve.engines.manifest import (
    MANIFEST_NAME,
    EngineFile,
    Manifest,
    Weights,
    describe_engine_file,
    write_manifest,
)

from .errors import ExportError
from .models import ModelSpec
from .onnx_export import DEFAULT_OPSET, export_decoder, export_encoder, export_factored_decoder, onnx_signature
from .weights import WeightsChoice, load_model

log = logging.getLogger(__name__)

# SAM2Transforms' ImageNet statistics, applied to pixels scaled to [0, 1].
PIXEL_MEAN = [0.485, 0.456, 0.406]
PIXEL_STD = [0.229, 0.224, 0.225]
MASK_THRESHOLD = 0.0
ENGINE_ROLES = ("encoder", "decoder", *FACTORED_ROLES)


def tool_versions() -> dict[str, str]:
    versions = {}
    for dist in ("sam2serve", "sam2", "torch", "onnx", "onnxscript", "onnxruntime"):
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            versions[dist] = "absent"
    return versions


def build_engines(
    spec: ModelSpec,
    out_dir: Path,
    weights: WeightsChoice,
    opset: int = DEFAULT_OPSET,
    progress: bool = True,
    timings: dict[str, float] | None = None,
) -> tuple[Manifest, torch.nn.Module]:
    """Write encoder.onnx, decoder.onnx, the factored decoder and manifest.json to `out_dir` (replacing it whole
    on success).

    Returns the manifest and the torch model the engines came from (for verification).
    """
    timings = {} if timings is None else timings
    out_dir = Path(out_dir)
    check_replaceable(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = _make_staging_dir(out_dir)
    try:
        steps: list[tuple[str, Callable[[], None]]] = []
        state: dict[str, object] = {}

        def load() -> None:
            state["model"], state["weights"] = load_model(spec, weights, progress=progress)

        steps = [
            ("load weights", load),
            ("export encoder", lambda: export_encoder(state["model"], staging / "encoder.onnx", opset)),
            ("export decoder", lambda: export_decoder(state["model"], staging / "decoder.onnx", opset)),
            ("export factored decoder", lambda: export_factored_decoder(state["model"], staging, opset)),
        ]
        with tqdm(steps, desc=f"export {spec.name}", unit="step", disable=not progress) as bar:
            for name, step in bar:
                bar.set_postfix_str(name)
                start = time.perf_counter()
                step()
                timings[name] = time.perf_counter() - start
                log.info("%s: %.1f s", name, timings[name])
        model = state["model"]
        manifest = make_manifest(spec, model, state["weights"], staging, opset)  # type: ignore[arg-type]
        write_manifest(staging, manifest)
        _replace_dir(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return manifest, model  # type: ignore[return-value]


def make_manifest(spec: ModelSpec, model: torch.nn.Module, weights: Weights, directory: Path,
                  opset: int, variants: dict[str, EngineFile] | None = None) -> Manifest:
    decoder = model.sam_mask_decoder
    return Manifest(
        model=spec.name,
        config=spec.config,
        weights=weights,
        image_size=int(model.image_size),
        pixel_mean=PIXEL_MEAN,
        pixel_std=PIXEL_STD,
        mask_threshold=MASK_THRESHOLD,
        low_res_mask_size=int(model.sam_prompt_encoder.mask_input_size[0]),
        mask_tokens=int(decoder.num_mask_tokens),
        dynamic_multimask_via_stability=bool(decoder.dynamic_multimask_via_stability),
        dynamic_multimask_stability_delta=float(decoder.dynamic_multimask_stability_delta),
        dynamic_multimask_stability_thresh=float(decoder.dynamic_multimask_stability_thresh),
        opset=opset,
        engines={role: describe_engine_file(directory / f"{role}.onnx", *onnx_signature(directory / f"{role}.onnx"))
                 for role in ENGINE_ROLES if (directory / f"{role}.onnx").exists()},
        variants=variants or {},
        tools=tool_versions(),
        created_at=dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat(),
    )


def check_replaceable(out_dir: Path) -> None:
    """An export replaces its directory whole: refuse one holding anything but an earlier export (e.g. `--out
    engines`, the parent of every model's directory), before minutes of work and without deleting a file."""
    if out_dir.is_dir() and any(out_dir.iterdir()) and not (out_dir / MANIFEST_NAME).is_file():
        raise ExportError(
            f"{out_dir} is not empty and holds no {MANIFEST_NAME}: an export replaces its directory whole, so its "
            f"files would be deleted. Give --out a new or empty directory, or one an earlier export wrote "
            f"(e.g. {out_dir / 'sam2.1_hiera_tiny'})"
        )


def _make_staging_dir(out_dir: Path) -> Path:
    """A new, empty sibling of out_dir to build in, made as `mkdir` makes directories (0777 less the umask).

    Not tempfile.mkdtemp: its 0700 would become the engine directory's mode, and a server running as another
    uid (the image's 10001, serving a root-exported directory mounted read-only) could not read it.
    """
    staging = out_dir.with_name(f".{out_dir.name}.{secrets.token_hex(8)}")
    staging.mkdir()  # never an existing directory
    return staging


def _replace_dir(staging: Path, out_dir: Path) -> None:
    """Swap the finished directory in; an older build is removed only after the new one is complete."""
    old = None
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.old-{time.time_ns()}")
        out_dir.rename(old)
    staging.rename(out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
