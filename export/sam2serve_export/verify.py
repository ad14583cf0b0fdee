"""Parity of exported engines with the torch model they came from, and with Meta's predictor."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from sam2serve.engines.base import ImageFeatures
from sam2serve.engines.mask_selection import select_single_mask
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


# Prompt batches checked without a mask input (the factored decoder): (batch, points, box); 257 crosses the
# heads' internal batches.
FACTORED_CASES = ((1, 1, False), (257, 1, False), (64, 3, False), (16, 2, True))
TORCH_CHUNK = 64  # the torch reference decodes in chunks of prompts (each prompt is independent)


def verify_engines(model: torch.nn.Module, engine_dir: Path, image: np.ndarray, image_label: str,
                   seed: int = 0, cases: tuple[tuple[int, int, bool], ...] = FACTORED_CASES,
                   prompts: bool = True) -> list[ParityRow]:
    """Torch vs ONNX Runtime on random inputs and on `image` (RGB uint8), through our runtime: the encoder, the
    factored decoder (without mask input) at the `cases`' batch sizes and prompt shapes, decoder.onnx with a mask
    input, and Meta's SAM2ImagePredictor against our preprocessing + engines + mask selection and against our prompt
    data plane (points, boxes, refinement; `prompts=False` leaves that last part out)."""
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

    graph = "factored" if engine.factored is not None else "decoder"
    for batch, points, box in cases:
        args = example_decoder_inputs(model, batch, points=points, seed=seed + batch + points, box=box)
        rows += _decoder_rows(graph, f"random B={batch} P={points}" + (" +box" if box else ""), decoder, engine,
                              args, manifest=engine.manifest)
    args = example_decoder_inputs(model, 8, points=1, seed=seed + 8, with_mask=True)
    rows += _decoder_rows("decoder", "random B=8 +mask", decoder, engine, args, manifest=engine.manifest)

    from sam2.sam2_image_predictor import SAM2ImagePredictor

    from .prompt_parity import prompt_parity  # it builds on this module's rows

    predictor = SAM2ImagePredictor(model)
    with torch.no_grad():
        predictor.set_image(image)
    rows += _predictor_parity(predictor, engine, image, image_label)
    if prompts:
        rows += prompt_parity(predictor, engine, image, image_label)
    return rows


def _decoder_rows(graph: str, case: str, decoder: torch.nn.Module, engine: OnnxEngine, args: tuple[torch.Tensor, ...],
                  manifest: object) -> list[ParityRow]:
    """All-token logits and IoU against the torch decoder, and the tokens SAM 2 would choose from them."""
    with_mask = bool(args[6].item())
    with torch.no_grad():
        parts = [decoder(*args[:3], *(a[i:i + TORCH_CHUNK] for a in args[3:6]), args[6])
                 for i in range(0, len(args[3]), TORCH_CHUNK)]
    ref = [torch.cat(p).numpy() for p in zip(*parts, strict=True)]
    feats = ImageFeatures(*(a.numpy() for a in args[:3]))
    got = list(engine.decode_all_tokens(feats, args[3].numpy(), args[4].numpy(),
                                        args[5].numpy() if with_mask else None))
    rows = compare(graph, case, ("masks", "iou_predictions"), ref, got, ("masks",))
    return [*rows, _token_choice_row(graph, case, ref, got, manifest)]


def _token_choice_row(graph: str, case: str, ref: list[np.ndarray], ours: list[np.ndarray],
                      manifest: object) -> ParityRow:
    """Fraction of prompts whose chosen token differs: the best multimask token by IoU, and SAM 2's single-mask
    choice (token 0, or the best multimask token when token 0 is unstable)."""

    def choices(masks: np.ndarray, iou: np.ndarray) -> np.ndarray:
        single, _ = select_single_mask(masks, iou, True, manifest.dynamic_multimask_stability_delta,  # type: ignore
                                       manifest.dynamic_multimask_stability_thresh)  # type: ignore[attr-defined]
        fallback = ~np.all(single[:, 0] == masks[:, 0], axis=(-1, -2))
        return np.stack([np.argmax(iou[:, 1:], axis=1), fallback])

    differs = float(np.mean(np.any(choices(*ref) != choices(*ours), axis=0)))
    return ParityRow(graph, case, "token choice", differs, differs)


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
    graph = "factored" if engine.factored is not None else "decoder"

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
        rows += compare(graph, case, ("masks", "iou_predictions"),
                        [ref_low.numpy(), ref_iou.numpy()],
                        [np.clip(got.low_res_logits, -32.0, 32.0), got.iou_predictions], ("masks",))
    # A box and a point per prompt: the predictor puts the box's corners first, labelled 2 and 3.
    boxes = np.concatenate([pts[:, 0] * 0.5, pts[:, 0] * 0.5 + np.array([w, h], np.float32) * 0.4], axis=1)
    corners = predictor._transforms.transform_boxes(torch.from_numpy(boxes), normalize=True, orig_hw=(h, w))
    with torch.no_grad():
        _, ref_iou, ref_low = predictor._predict(coords, torch.from_numpy(labels), boxes=corners,
                                                 multimask_output=True, return_logits=True)
    box_coords = np.concatenate([corners.reshape(-1, 2, 2).numpy(), coords.numpy()], axis=1)
    box_labels = np.concatenate([np.tile(np.array([[2.0, 3.0]], np.float32), (len(pts), 1)), labels], axis=1)
    got = engine.decode(feats, box_coords, box_labels, multimask=True)
    rows += compare(graph, f"{label} 16 box+point prompts", ("masks", "iou_predictions"),
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
