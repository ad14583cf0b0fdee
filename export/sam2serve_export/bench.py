"""`sam2serve bench IMAGE`: Meta's generator and ours on the same image, parameters and weights, each in
its own process (for an honest peak RSS); prints both wall times, the ratio, our stages and the floor.

This module imports torch only inside functions: the child that runs ours unpickles `_run_ours` from here, and a
module-level import of the harness (torch, ≈ 0.5 GB resident) would count in our peak RSS although the server
never loads it."""

from __future__ import annotations

import argparse
import json
import multiprocessing
import resource
import time
from pathlib import Path
from typing import Any

from sam2serve.amg.params import GeneratorParams
from sam2serve.engines.contract import ENCODER_ROLES, encoder_role


def parser() -> argparse.ArgumentParser:
    from .harness import add_generator_flags

    p = argparse.ArgumentParser(prog="sam2serve bench", description=__doc__)
    p.add_argument("image", type=Path)
    p.add_argument("--engines", type=Path, default=Path("engines/sam2.1_hiera_tiny"))
    p.add_argument("--checkpoint", type=Path)
    p.add_argument("--cache-dir", type=Path, default=Path("checkpoints"))
    p.add_argument("--threads", type=int, default=0, help="intra-op threads for both sides (0: all cores)")
    p.add_argument("--max-decoder-batch", type=int, default=8)
    p.add_argument("--head-workers", type=int,
                   help="factored heads' batches run this many at a time, one thread each (1: intra-op threads; "
                        "default: the engine's choice)")
    p.add_argument("--prompt-head-batch", type=int, help="prompt-head batch (default: the engine's choice)")
    p.add_argument("--encoder-precision", choices=sorted(ENCODER_ROLES), default="fp32",
                   help="int8: our side runs the opt-in encoder_int8 variant (export --int8-encoder); its masks "
                        "differ slightly from the reference's")
    p.add_argument("--skip-reference", action="store_true")
    p.add_argument("--json", action="store_true")
    add_generator_flags(p)
    return p


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _run_ours(engines: str, image_path: str, params: GeneratorParams, threads: int, batch: int,
              head_workers: int | None = None, prompt_head_batch: int | None = None,
              encoder_precision: str = "fp32") -> dict[str, Any]:
    from sam2serve.amg import AutoMaskGenerator
    from sam2serve.engines.onnx_engine import OnnxEngine
    from sam2serve.images import read_rgb

    engine = OnnxEngine(engines, providers=["CPUExecutionProvider"], intra_op_threads=threads,
                        head_workers=head_workers, prompt_head_batch=prompt_head_batch,
                        encoder_variant=encoder_role(encoder_precision))
    warm = engine.factored.stats.as_dict() if engine.factored is not None else None
    start = time.perf_counter()
    image = read_rgb(image_path)
    decode_s = time.perf_counter() - start
    result = AutoMaskGenerator(engine, max_decoder_batch=batch).generate(image, params)
    wall = time.perf_counter() - start
    stages = {"decode_image": decode_s, **result.timings}
    heads = None
    if warm is not None:
        done = engine.factored.stats.as_dict()  # type: ignore[union-attr]
        heads = {k: done[k] - warm[k] for k in done}
    return {"wall_s": wall, "stages_s": stages, "masks": len(result.records), "counts": result.counts,
            "engine_floor_s": stages["encoder"] + stages["decoder"], "peak_rss_mb": _peak_rss_mb(),
            "decoder_heads": heads}


def _run_reference(engines: str, image_path: str, params: GeneratorParams, threads: int,
                   checkpoint: str | None, cache_dir: str) -> dict[str, Any]:
    import torch

    from sam2serve.engines.manifest import read_manifest
    from sam2serve.images import read_rgb

    from .harness import torch_model_for
    from .reference import run_reference

    if threads:
        torch.set_num_threads(threads)
    model = torch_model_for(read_manifest(Path(engines)), Path(checkpoint) if checkpoint else None, Path(cache_dir))
    start = time.perf_counter()
    masks = run_reference(model, read_rgb(image_path), params)
    return {"wall_s": time.perf_counter() - start, "masks": len(masks), "peak_rss_mb": _peak_rss_mb()}


def _in_child(fn: Any, *args: Any) -> dict[str, Any]:
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(fn, args)


def main(argv: list[str]) -> int:
    from .harness import params_from_args

    args = parser().parse_args(argv)
    params = params_from_args(args)
    ours = _in_child(_run_ours, str(args.engines), str(args.image), params, args.threads, args.max_decoder_batch,
                     args.head_workers, args.prompt_head_batch, args.encoder_precision)
    ref = None if args.skip_reference else _in_child(
        _run_reference, str(args.engines), str(args.image), params, args.threads,
        str(args.checkpoint) if args.checkpoint else None, str(args.cache_dir))
    post = ours["stages_s"]["postprocess"] + ours["stages_s"]["encoding"]
    summary = {"image": str(args.image), "encoder_precision": args.encoder_precision,
               "params": {k: v for k, v in params.__dict__.items() if k != "point_grids"},
               "ours": ours, "reference": ref,
               "speedup": ref["wall_s"] / ours["wall_s"] if ref else None,
               "wall_over_floor": ours["wall_s"] / ours["engine_floor_s"],
               "postprocess_share": post / ours["wall_s"]}
    print(f"{'':14}{'wall s':>9}{'masks':>7}{'peak RSS MB':>13}")
    if ref:
        print(f"{'reference':14}{ref['wall_s']:9.1f}{ref['masks']:7d}{ref['peak_rss_mb']:13.0f}")
    label = "sam2serve" if args.encoder_precision == "fp32" else f"sam2serve {args.encoder_precision}"
    print(f"{label:14}{ours['wall_s']:9.1f}{ours['masks']:7d}{ours['peak_rss_mb']:13.0f}")
    if ref:
        print(f"speed-up: {summary['speedup']:.2f}x")
    print("our stages: " + ", ".join(f"{k} {v:.2f}s" for k, v in ours["stages_s"].items()))
    print(f"engine floor (encoder + decoder calls): {ours['engine_floor_s']:.1f}s; wall / floor "
          f"{summary['wall_over_floor']:.3f}; post-processing + encoding {100 * summary['postprocess_share']:.1f}% "
          "of wall")
    print("filter counts: " + json.dumps(ours["counts"]))
    heads = ours["decoder_heads"]
    if heads:
        prompts, masked = heads["prompts"], heads["masked_prompts"]
        per = lambda s, n: f"{1e3 * s / n:.2f} ms per prompt" if n else "not run"  # noqa: E731
        print(f"decoder: context {heads['context_s']:.2f}s for {heads['contexts']:.0f} image(s); prompt head "
              f"{per(heads['prompt_head_s'], prompts)} ({prompts:.0f} prompts); mask head "
              f"{per(heads['mask_head_s'], masked)} ({masked:.0f} prompts reached it)")
    else:
        print("decoder: decoder.onnx for every prompt (no factored decoder in these engines)")
    if args.json:
        print(json.dumps(summary))
    return 0
