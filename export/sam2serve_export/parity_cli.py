"""`sam2serve parity IMAGE…`: Meta's generator and ours on the same images, parameters and decoder."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from sam2serve.amg import AutoMaskGenerator
from sam2serve.engines.manifest import read_manifest
from sam2serve.engines.onnx_engine import OnnxEngine
from sam2serve.images import read_rgb

from .errors import ExportError
from .harness import add_generator_flags, params_from_args, torch_model_for
from .parity import compare_masks, format_report
from .reference import run_reference
from .synthetic import SyntheticEngine, inject_synthetic_decoder


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sam2serve parity", description=__doc__)
    p.add_argument("images", nargs="+", type=Path)
    p.add_argument("--engines", type=Path, default=Path("engines/sam2.1_hiera_tiny"))
    p.add_argument("--checkpoint", type=Path, help="checkpoint the engines came from (trained engines)")
    p.add_argument("--cache-dir", type=Path, default=Path("checkpoints"))
    p.add_argument("--decoder", choices=["engines", "synthetic", "both"], default="both",
                   help="real engines vs torch, and/or the synthetic decoder injected into both generators")
    p.add_argument("--min-miou", type=float, default=0.999, help="fail below this mean IoU of pairs")
    p.add_argument("--json", action="store_true", help="one JSON summary line last")
    add_generator_flags(p)
    return p


def main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    try:
        return run(args)
    except ExportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def run(args: argparse.Namespace) -> int:
    params = params_from_args(args)
    manifest = read_manifest(args.engines)
    modes = ["engines", "synthetic"] if args.decoder == "both" else [args.decoder]
    rows, ok = [], True
    for mode in modes:
        model = torch_model_for(manifest, args.checkpoint, args.cache_dir)
        if mode == "synthetic":
            inject_synthetic_decoder(model)
            engine = SyntheticEngine(manifest)
        else:
            engine = OnnxEngine(args.engines, providers=["CPUExecutionProvider"])
        generator = AutoMaskGenerator(engine)
        for path in args.images:
            image = read_rgb(path)
            start = time.perf_counter()
            reference = run_reference(model, image, params)
            ref_s = time.perf_counter() - start
            start = time.perf_counter()
            ours = generator.generate(image, params)
            our_s = time.perf_counter() - start
            report = compare_masks(reference, ours.records)
            passed = report.reference_masks == report.our_masks and report.mean_iou >= args.min_miou
            ok &= passed
            print(format_report(f"{path.name} [{mode}]", report) + f"  {'PASS' if passed else 'FAIL'}")
            rows.append({"image": str(path), "decoder": mode, **report.as_dict(), "reference_s": ref_s,
                         "ours_s": our_s, "filter_counts": ours.counts, "pass": passed})
    if not manifest.weights.trained:
        print("note: untrained engines give near-degenerate masks; the synthetic decoder exercises the filters")
    if args.json:
        print(json.dumps({"params": {k: v for k, v in params.__dict__.items() if k != "point_grids"},
                          "results": rows, "pass": ok}))
    return 0 if ok else 1
