"""The `sam2serve` command: export engines, check an engine directory, and (later) serve and segment."""

from __future__ import annotations

import argparse
import json
import sys


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] in (["export"], ["parity"], ["bench"]):
        return _export_tool(argv[0], argv[1:])
    parser = argparse.ArgumentParser(prog="sam2serve", description="SAM 2 automatic mask generation service.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("export", help="build engines from a SAM 2 checkpoint (needs the 'export' extra)")
    sub.add_parser("parity", help="compare our masks with Meta's generator (needs the 'export' extra)")
    sub.add_parser("bench", help="time Meta's generator and ours side by side (needs the 'export' extra)")
    serve = sub.add_parser("serve", help="serve the gRPC API (config from flags, else SAM2SERVE_* env)")
    from .config import add_config_flags
    from .engines.contract import ENCODER_ROLES

    add_config_flags(serve)
    seg = sub.add_parser("segment", help="segment an image through a running server and write the outputs")
    seg.add_argument("image", help="image file, or an http(s) URL the server fetches")
    seg.add_argument("--server", default="127.0.0.1:50051")
    seg.add_argument("--out", default="out", help="directory for combined mask, masks, metadata, overlay")
    seg.add_argument("--queue", action="store_true", help="submit to the queue and show live status")
    seg.add_argument("--api-key", default=None, help="API key (default: env SAM2SERVE_API_KEY)")
    seg.add_argument("--points-per-side", type=int)
    seg.add_argument("--format", choices=["png", "jpeg", "webp"], default="png")
    seg.add_argument("--max-masks", type=int)
    seg.add_argument("--timeout", type=float, default=600.0, help="seconds before giving up")
    from .prompt_client import parse_box, parse_point

    prompted = seg.add_argument_group("prompted segmentation (any --point or --box: masks for these prompts only)")
    prompted.add_argument("--point", action="append", type=parse_point, metavar="X,Y[,LABEL]",
                          help="a click in pixels; LABEL 1 foreground (default) or 0 background; repeatable")
    prompted.add_argument("--box", action="append", type=parse_box, metavar="X0,Y0,X1,Y1",
                          help="a box in pixels; several boxes give one mask set each")
    prompted.add_argument("--single-mask", action="store_true", help="one mask per prompt set instead of three")
    check = sub.add_parser("check-engines", help="validate an engine directory and load it")
    check.add_argument("engines", help="engine directory")
    check.add_argument("--providers", help="comma-separated onnxruntime providers (default: best available)")
    check.add_argument("--encoder-precision", choices=sorted(ENCODER_ROLES), default="fp32",
                       help="int8: also require (and load) the opt-in int8 encoder")
    args = parser.parse_args(argv)
    if args.command == "check-engines":
        return _check_engines(args)
    if args.command == "serve":
        return _serve(args)
    if args.command == "segment":
        if args.point or args.box:
            if args.queue or args.points_per_side is not None or args.max_masks is not None:
                parser.error("--queue, --points-per-side and --max-masks are for automatic segmentation, "
                             "not with --point/--box")
            from .prompt_client import prompt_command

            return prompt_command(args)
        from .client import segment_command

        return segment_command(args)
    return 2


def _serve(args: argparse.Namespace) -> int:
    import asyncio
    import logging

    from .app import serve_forever
    from .config import config_from
    from .engines import ManifestError
    from .errors import QueueUnavailable, StartupError

    config = config_from(args)
    logging.basicConfig(level=config.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    print(f"sam2serve config: {config.describe()}", flush=True)
    try:
        return asyncio.run(serve_forever(config))
    except (ManifestError, StartupError, QueueUnavailable) as e:  # what to change, without a traceback
        print(f"error: {e}", file=sys.stderr)
        return 2


def _export_tool(command: str, argv: list[str]) -> int:
    """Commands that need torch and Meta's sam2 live in sam2serve_export; import them only when asked."""
    import importlib

    module = {"export": "cli", "parity": "parity_cli", "bench": "bench"}[command]
    try:
        tool = importlib.import_module(f"sam2serve_export.{module}")
    except ImportError as e:
        print(
            f"error: `sam2serve {command}` needs the export tools ({e.name} is not installed); "
            "install them with: pip install 'sam2serve[export]' and Meta's sam2 (see README)",
            file=sys.stderr,
        )
        return 2
    return tool.main(argv)


def _check_engines(args: argparse.Namespace) -> int:
    from .engines import ManifestError
    from .engines.contract import encoder_role
    from .engines.onnx_engine import OnnxEngine

    try:
        engine = OnnxEngine(args.engines, providers=args.providers.split(",") if args.providers else None,
                            encoder_variant=encoder_role(args.encoder_precision))
    except ManifestError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    m = engine.manifest
    print(json.dumps({"model": m.model, "weights": m.weights.origin, "trained": m.weights.trained,
                      "providers": engine.active_providers, "engines": {k: v.file for k, v in m.engines.items()},
                      "encoder_precision": engine.info.encoder_precision}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
