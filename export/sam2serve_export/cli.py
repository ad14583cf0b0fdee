"""`sam2serve export …` (ONNX engines) and `sam2serve export trt …` (TensorRT plans)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from .errors import ChecksumMismatchError, DownloadError, ExportError
from .models import DEFAULT_MODEL, MODELS, get_model_spec
from .onnx_export import DEFAULT_OPSET
from .weights import WeightsChoice

log = logging.getLogger("sam2serve.export")

UNTRAINED_BANNER = """
************************************************************************************
*  UNTRAINED WEIGHTS: these engines come from a randomly initialised {model:<14}*
*  (seed {seed:<6}). They run the real architecture but their masks are MEANINGLESS.   *
*  Use --download or --checkpoint with an official checkpoint for real segmentation. *
************************************************************************************"""


def onnx_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sam2serve export", description="Build ONNX engines from a SAM 2 model.")
    p.add_argument("--model", default=DEFAULT_MODEL, choices=list(MODELS), help="official model name")
    p.add_argument("--out", type=Path, help="engine directory (default: engines/<model>)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", type=Path, help="official checkpoint file ({'model': state_dict})")
    src.add_argument("--download", action="store_true", help="fetch the official checkpoint (SHA-256 pinned)")
    src.add_argument("--untrained", action="store_true", help="random init of the real architecture (tests)")
    src.add_argument("--download-or-untrained", action="store_true",
                     help="download when the host is reachable, else untrained weights with a loud warning")
    p.add_argument("--seed", type=int, default=0, help="seed for --untrained")
    p.add_argument("--base-url", help="mirror to download from instead of Meta's host")
    p.add_argument("--cache-dir", type=Path, default=Path("checkpoints"), help="where downloads are kept")
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET)
    p.add_argument("--verify", action="store_true", help="check parity with torch; fail above --tolerance")
    p.add_argument("--verify-image", type=Path, help="real image for --verify (default: a synthetic scene)")
    p.add_argument("--tolerance", type=float, default=1e-4, help="max relative error accepted by --verify")
    p.add_argument("--int8-encoder", action="store_true", help="also build encoder_int8.onnx (CPU variant)")
    p.add_argument("--fp16", action="store_true", help="also build encoder_fp16.onnx and decoder_fp16.onnx")
    p.add_argument("--json", action="store_true", help="print one JSON summary line last")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def trt_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sam2serve export trt",
                                description="Build TensorRT plans for this GPU from an ONNX engine directory.")
    p.add_argument("--engines", type=Path, required=True, help="engine directory with encoder/decoder.onnx")
    p.add_argument("--fp16", action="store_true", help="fp16 kernels (normalisation layers stay fp32)")
    p.add_argument("--max-batch", type=int, default=1024, help="largest point batch of the decoder profile")
    p.add_argument("--opt-batch", type=int, default=64, help="point batch the decoder is tuned for")
    p.add_argument("--quiet", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        if argv[:1] == ["trt"]:
            return run_trt(trt_parser().parse_args(argv[1:]))
        return run_onnx(onnx_parser().parse_args(argv))
    except ExportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def run_trt(args: argparse.Namespace) -> int:
    from .trt_build import build_trt_engines

    out = build_trt_engines(args.engines, fp16=args.fp16, max_batch=args.max_batch, opt_batch=args.opt_batch,
                            progress=not args.quiet)
    print(f"TensorRT plans written to {out}")
    return 0


def run_onnx(args: argparse.Namespace) -> int:
    from sam2serve.images import read_rgb, synthetic_scene

    from .build import build_engines
    from .verify import check_parity, format_table, verify_engines

    spec = get_model_spec(args.model)
    out = args.out or Path("engines") / spec.name
    choice = _weights_choice(args)
    if args.download_or_untrained:
        choice = _download_or_untrained(args, choice)
    timings: dict[str, float] = {}
    started = time.perf_counter()
    manifest, model = build_engines(spec, out, choice, opset=args.opset, progress=not args.quiet,
                                    timings=timings)
    if not manifest.weights.trained:
        log.warning(UNTRAINED_BANNER.format(model=spec.name, seed=manifest.weights.seed))

    variants = _build_variants(args, out, spec, model, manifest)
    summary: dict[str, object] = {"model": spec.name, "engines": str(out), "weights": manifest.weights.origin,
                                  "timings_s": timings, "variants": variants}
    if args.verify:
        if args.verify_image:
            image, label = read_rgb(args.verify_image), args.verify_image.name
        else:
            image, label = synthetic_scene(), "synthetic scene"
        start = time.perf_counter()
        rows = verify_engines(model, out, image, label)
        timings["verify"] = time.perf_counter() - start
        print(format_table(rows, args.tolerance))
        summary["max_relative_error"] = max(r.relative for r in rows)
        check_parity(rows, args.tolerance)
        print(f"parity OK: every output within relative error {args.tolerance:g}")
        if "encoder_int8" in variants:
            from .variants import variant_mask_drift

            variants["encoder_int8"] = variant_mask_drift(out, "encoder_int8", image)
            print(f"encoder_int8 vs fp32 on {label}: {json.dumps(variants['encoder_int8'])}")
    timings["total"] = time.perf_counter() - started
    print(f"engines for {spec.name} ({choice.describe()}) written to {out} in {timings['total']:.0f} s")
    if args.json:
        print(json.dumps(summary))
    return 0


def _weights_choice(args: argparse.Namespace) -> WeightsChoice:
    if args.untrained:
        return WeightsChoice(untrained_seed=args.seed)
    if args.checkpoint:
        return WeightsChoice(checkpoint=args.checkpoint)
    return WeightsChoice(download=True, base_url=args.base_url, cache_dir=args.cache_dir)


def _download_or_untrained(args: argparse.Namespace, choice: WeightsChoice) -> WeightsChoice:
    from .download import download_checkpoint

    spec = get_model_spec(args.model)
    try:
        download_checkpoint(spec, args.cache_dir, base_url=args.base_url, progress=not args.quiet)
    except ChecksumMismatchError:
        raise  # a host serving the wrong file is an error, not a reason to go untrained
    except DownloadError as e:
        log.warning("official checkpoint unavailable (%s); FALLING BACK TO UNTRAINED WEIGHTS", e)
        return WeightsChoice(untrained_seed=args.seed)
    return choice  # now cached: the build re-verifies it and records origin "download"


def _build_variants(args: argparse.Namespace, out: Path, spec: object, model: object,
                    manifest: object) -> dict[str, object]:
    from dataclasses import replace

    from sam2serve.engines.manifest import write_manifest

    from .variants import build_fp16, build_int8_encoder

    variants = {}
    if args.int8_encoder:
        variants["encoder_int8"] = build_int8_encoder(out)
    if args.fp16:
        variants["encoder_fp16"] = build_fp16(out, "encoder")
        variants["decoder_fp16"] = build_fp16(out, "decoder")
    if variants:
        write_manifest(out, replace(manifest, variants={**manifest.variants, **variants}))  # type: ignore
    return {name: v.precision for name, v in variants.items()}
