"""Parity of exported engines with the torch model they came from, and with Meta's predictor."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from sam2serve.engines.onnx_engine import OnnxEngine
from sam2serve.preprocess import to_model_input

from .errors import ParityError
from .wrappers import ImageEncoder, PromptDecoder, example_decoder_inputs

DEFAULT_TOLERANCE = 1e-4


@dataclass(frozen=True)
class ParityRow:
    graph: str
    case: str
    output: str
    max_abs: float
    relative: float  # max |torch - ours| / max |torch|
    sign_flips: float | None = None  # fraction of mask logits whose sign differs


def compare(graph: str, case: str, names: tuple[str, ...], ref: list[np.ndarray], ours: list[np.ndarray],
            mask_outputs: tuple[str, ...] = ()) -> list[ParityRow]:
    rows = []
    for name, r, o in zip(names, ref, ours, strict=True):
        if r.shape != o.shape:
            raise ParityError(f"{graph} {case}: output {name} has shape {o.shape}, torch gives {r.shape}")
        diff = float(np.max(np.abs(r.astype(np.float64) - o)))
        scale = float(np.max(np.abs(r))) or 1.0
        flips = float(np.mean((r > 0) != (o > 0))) if name in mask_outputs else None
        rows.append(ParityRow(graph, case, name, diff, diff / scale, flips))
    return rows


def verify_engines(model: torch.nn.Module, engine_dir: Path, image: np.ndarray, image_label: str,
                   seed: int = 0) -> list[ParityRow]:
    """Torch vs ONNX Runtime on random inputs and on `image` (RGB uint8), through our runtime; then Meta's
    SAM2ImagePredictor.predict vs our prompt data plane on `image` (points, boxes, refinement)."""
    engine = OnnxEngine(engine_dir, providers=["CPUExecutionProvider"], warmup=False)
    rows: list[ParityRow] = []
    encoder, decoder = ImageEncoder(model).eval(), PromptDecoder(model).eval()
    size = model.image_size
    g = torch.Generator().manual_seed(seed)

    x = torch.randn(1, 3, size, size, generator=g)
    with torch.no_grad():
        ref = [t.numpy() for t in encoder(x)]
    ours = engine.encode(x.numpy())
    rows += compare("encoder", "random input", ENC_NAMES, ref, _features(ours))

    for batch, with_mask in ((1, False), (64, False), (8, True)):
        args = example_decoder_inputs(model, batch, points=1, seed=seed + batch, with_mask=with_mask)
        with torch.no_grad():
            ref = [t.numpy() for t in decoder(*args)]
        feats = type(ours)(*(a.numpy() for a in args[:3]))
        got = engine.decode_all_tokens(feats, args[3].numpy(), args[4].numpy(),
                                       args[5].numpy() if with_mask else None)
        case = f"random B={batch}" + (" +mask" if with_mask else "")
        rows += compare("decoder", case, ("masks", "iou_predictions"), ref, list(got), ("masks",))

    from sam2.sam2_image_predictor import SAM2ImagePredictor

    from .prompt_parity import prompt_parity  # it builds on this module's rows

    predictor = SAM2ImagePredictor(model)
    with torch.no_grad():
        predictor.set_image(image)
    rows += _predictor_parity(predictor, engine, image, image_label)
    rows += prompt_parity(predictor, engine, image, image_label)
    return rows


ENC_NAMES = ("image_embed", "high_res_feats_0", "high_res_feats_1")


def _features(f: object) -> list[np.ndarray]:
    return [f.image_embed, f.high_res_feats_0, f.high_res_feats_1]  # type: ignore[attr-defined]


def _predictor_parity(predictor: object, engine: OnnxEngine, image: np.ndarray,
                      label: str) -> list[ParityRow]:
    """Meta's SAM2ImagePredictor (its own preprocessing, encoder, prompt handling, mask selection; `image` set)
    vs our preprocessing + engines + mask selection, on a 4×4 grid of single-point prompts."""
    m = engine.manifest
    feats = engine.encode(to_model_input(image, m.image_size, m.pixel_mean, m.pixel_std))
    ref_feats = [predictor._features["image_embed"], *predictor._features["high_res_feats"]]
    rows = compare("encoder", f"{label} (Meta predictor)", ENC_NAMES,
                   [t.numpy() for t in ref_feats], _features(feats))

    h, w = image.shape[:2]
    grid = (np.arange(4, dtype=np.float32) + 0.5) / 4
    pts = np.stack(np.meshgrid(grid * w, grid * h), axis=-1).reshape(-1, 1, 2)
    coords = predictor._transforms.transform_coords(torch.from_numpy(pts), normalize=True, orig_hw=(h, w))
    labels = np.ones((len(pts), 1), np.float32)
    for multimask in (True, False):
        with torch.no_grad():
            _, ref_iou, ref_low = predictor._predict(coords, torch.from_numpy(labels),
                                                     multimask_output=multimask, return_logits=True)
        got = engine.decode(feats, coords.numpy(), labels, multimask=multimask)
        case = f"{label} 16 prompts, " + ("multimask" if multimask else "single (dynamic)")
        rows += compare("decoder", case, ("masks", "iou_predictions"),
                        [ref_low.numpy(), ref_iou.numpy()],
                        [np.clip(got.low_res_logits, -32.0, 32.0), got.iou_predictions], ("masks",))
    return rows


def format_table(rows: list[ParityRow], tolerance: float = DEFAULT_TOLERANCE) -> str:
    header = f"{'graph':8} {'case':52} {'output':17} {'max abs':>10} {'relative':>10} {'sign flips':>10}  ok"
    lines = [header, "-" * len(header)]
    for r in rows:
        flips = f"{r.sign_flips:.1e}" if r.sign_flips is not None else "-"
        ok = "yes" if r.relative <= tolerance else "NO"
        lines.append(f"{r.graph:8} {r.case:52} {r.output:17} {r.max_abs:10.2e} {r.relative:10.2e} {flips:>10}  {ok}")
    return "\n".join(lines)


def check_parity(rows: list[ParityRow], tolerance: float = DEFAULT_TOLERANCE) -> None:
    bad = [r for r in rows if not r.relative <= tolerance]
    if bad:
        worst = max(bad, key=lambda r: r.relative)
        raise ParityError(
            f"{len(bad)} outputs exceed relative error {tolerance:g}; worst: {worst.graph} {worst.case} "
            f"{worst.output} at {worst.relative:.2e}"
        )
