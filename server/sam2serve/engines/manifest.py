"""The engine directory's manifest: what was exported, from which weights, with which I/O contract.

An engine directory is served only after its manifest parsed, every file it names exists with the
recorded SHA-256, and (when sessions are opened) every graph's inputs and outputs match the manifest.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

MANIFEST_NAME = "manifest.json"
FORMAT_VERSION = 1
UNTRAINED = "untrained"
WEIGHT_ORIGINS = ("checkpoint", "download", UNTRAINED)

Dim = int | str  # a fixed size, or the name of a dynamic axis


class ManifestError(Exception):
    """The engine directory cannot be served; the message says which file and what is wrong."""


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str
    shape: list[Dim | None]  # None: a dynamic axis without a name, as a loaded graph reports it


@dataclass(frozen=True)
class EngineFile:
    file: str
    sha256: str
    bytes: int
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    precision: str = "fp32"


# The export flag that builds each optional variant, for the error that names a missing one.
VARIANT_FLAGS = {"encoder_int8": "--int8-encoder", "encoder_fp16": "--fp16", "decoder_fp16": "--fp16"}


@dataclass(frozen=True)
class Weights:
    origin: str  # checkpoint | download | untrained
    sha256: str | None = None  # of the checkpoint file
    seed: int | None = None  # untrained only
    source: str | None = None  # URL or file name the weights came from

    @property
    def trained(self) -> bool:
        return self.origin != UNTRAINED


@dataclass(frozen=True)
class Manifest:
    model: str
    config: str
    weights: Weights
    image_size: int
    pixel_mean: list[float]  # applied to pixels scaled to [0, 1]
    pixel_std: list[float]
    mask_threshold: float
    low_res_mask_size: int
    mask_tokens: int  # decoder outputs all tokens: 0 = single mask, 1.. = multimask
    dynamic_multimask_via_stability: bool
    dynamic_multimask_stability_delta: float
    dynamic_multimask_stability_thresh: float
    opset: int
    engines: dict[str, EngineFile]  # "encoder", "decoder"
    variants: dict[str, EngineFile] = field(default_factory=dict)  # e.g. "encoder_int8"
    tools: dict[str, str] = field(default_factory=dict)
    created_at: str = ""
    format_version: int = FORMAT_VERSION

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=False) + "\n"

    def engine_file(self, role: str) -> EngineFile:
        """`role` is "encoder", "decoder" or a variant name such as "encoder_int8"."""
        found = self.engines.get(role) or self.variants.get(role)
        if found is None:
            known = sorted([*self.engines, *self.variants])
            how = f"; `sam2serve export {VARIANT_FLAGS[role]}` builds it" if role in VARIANT_FLAGS else ""
            raise ManifestError(f"the manifest has no engine {role!r}; it has {', '.join(known)}{how}")
        return found


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def describe_engine_file(path: Path, inputs: list[TensorSpec], outputs: list[TensorSpec],
                         precision: str = "fp32") -> EngineFile:
    return EngineFile(path.name, sha256_file(path), path.stat().st_size, inputs, outputs, precision)


def write_manifest(directory: Path, manifest: Manifest) -> Path:
    path = directory / MANIFEST_NAME
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(manifest.to_json())
    tmp.replace(path)
    return path


def read_manifest(directory: Path) -> Manifest:
    path = Path(directory) / MANIFEST_NAME
    if not Path(directory).is_dir():
        raise ManifestError(f"engine directory {directory} does not exist")
    if not path.is_file():
        raise ManifestError(
            f"{path} is missing: {directory} is not an engine directory (build one with `sam2serve export`)"
        )
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ManifestError(f"{path} is not valid JSON: {e}") from None
    return manifest_from_dict(raw, path)


def manifest_from_dict(raw: Any, where: Path | str = MANIFEST_NAME) -> Manifest:
    if not isinstance(raw, dict):
        raise ManifestError(f"{where}: expected a JSON object")
    version = raw.get("format_version")
    if version != FORMAT_VERSION:
        raise ManifestError(
            f"{where}: format_version {version!r} is not supported (this server reads {FORMAT_VERSION})"
        )
    try:
        weights = Weights(**raw["weights"])
        engines = {k: _engine_file(v) for k, v in raw["engines"].items()}
        variants = {k: _engine_file(v) for k, v in raw.get("variants", {}).items()}
        fields = {k: v for k, v in raw.items() if k not in ("weights", "engines", "variants")}
        manifest = Manifest(weights=weights, engines=engines, variants=variants, **fields)
    except (KeyError, TypeError, AttributeError) as e:
        raise ManifestError(f"{where}: malformed manifest ({type(e).__name__}: {e})") from None
    if weights.origin not in WEIGHT_ORIGINS:
        raise ManifestError(f"{where}: weights.origin {weights.origin!r} is not one of {WEIGHT_ORIGINS}")
    for role in ("encoder", "decoder"):
        if role not in engines:
            raise ManifestError(f"{where}: no {role} engine listed")
    return manifest


def _engine_file(raw: dict[str, Any]) -> EngineFile:
    return EngineFile(
        **{
            **raw,
            "inputs": [TensorSpec(**t) for t in raw["inputs"]],
            "outputs": [TensorSpec(**t) for t in raw["outputs"]],
        }
    )


def verify_engine_files(directory: Path, manifest: Manifest, roles: list[str] | None = None) -> None:
    """Every named engine file exists, has the recorded size and SHA-256."""
    for role in roles or [*manifest.engines, *manifest.variants]:
        entry = manifest.engine_file(role)
        path = Path(directory) / entry.file
        if not path.is_file():
            raise ManifestError(f"{role} engine file {path} is missing (listed in {MANIFEST_NAME})")
        size = path.stat().st_size
        if size != entry.bytes:
            raise ManifestError(
                f"{role} engine file {path} has {size} bytes, the manifest says {entry.bytes}: "
                "the file was changed or truncated; rebuild the engines"
            )
        actual = sha256_file(path)
        if actual != entry.sha256:
            raise ManifestError(
                f"{role} engine file {path} has SHA-256 {actual}, the manifest says {entry.sha256}: "
                "the file was changed after export; rebuild the engines"
            )


def check_signature(role: str, declared: list[TensorSpec], actual: list[TensorSpec], kind: str) -> None:
    """The graph's `kind` ("input"/"output") tensors match the manifest: names, dtypes, shapes."""
    if [t.name for t in declared] != [t.name for t in actual]:
        raise ManifestError(
            f"{role} {kind}s are {[t.name for t in actual]}, the manifest says {[t.name for t in declared]}"
        )
    for want, got in zip(declared, actual, strict=True):
        if want.dtype != got.dtype:
            raise ManifestError(f"{role} {kind} {got.name} has dtype {got.dtype}, the manifest says {want.dtype}")
        if not _shapes_agree(want.shape, got.shape):
            raise ManifestError(f"{role} {kind} {got.name} has shape {got.shape}, the manifest says {want.shape}")


def _shapes_agree(declared: list[Dim | None], actual: list[Dim | None]) -> bool:
    if len(declared) != len(actual):
        return False
    for d, a in zip(declared, actual, strict=True):
        if (d is None or isinstance(d, str)) != (a is None or isinstance(a, str)):
            return False
        if isinstance(d, int) and isinstance(a, int) and d != a:
            return False
    return True
