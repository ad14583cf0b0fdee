"""The `sam2serve` command: export engines, check an engine directory, and (later) serve and segment."""

from __future__ import annotations

import argparse
import json
import sys


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["export"]:
        return _export(argv[1:])
    parser = argparse.ArgumentParser(prog="sam2serve", description="SAM 2 automatic mask generation service.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("export", help="build engines from a SAM 2 checkpoint (needs the 'export' extra)")
    check = sub.add_parser("check-engines", help="validate an engine directory and load it")
    check.add_argument("engines", help="engine directory")
    check.add_argument("--providers", help="comma-separated onnxruntime providers (default: best available)")
    args = parser.parse_args(argv)
    if args.command == "check-engines":
        return _check_engines(args)
    return 2


def _export(argv: list[str]) -> int:
    try:
        from sam2serve_export.cli import main as export_main
    except ImportError as e:
        print(
            f"error: `sam2serve export` needs the export tools ({e.name} is not installed); "
            "install them with: pip install 'sam2serve[export]' and Meta's sam2 (see README)",
            file=sys.stderr,
        )
        return 2
    return export_main(argv)


def _check_engines(args: argparse.Namespace) -> int:
    from .engines import ManifestError
    from .engines.onnx_engine import OnnxEngine

    try:
        engine = OnnxEngine(args.engines, providers=args.providers.split(",") if args.providers else None)
    except ManifestError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    m = engine.manifest
    print(json.dumps({"model": m.model, "weights": m.weights.origin, "trained": m.weights.trained,
                      "providers": engine.active_providers, "engines": {k: v.file for k, v in m.engines.items()}}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
