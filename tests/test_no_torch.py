"""The server package never needs torch: it imports and runs engines with torch made unimportable."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from conftest import needs_export_tools

BLOCK_TORCH = "import sys; sys.modules['torch'] = None; sys.modules['sam2'] = None\n"


def _run(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", BLOCK_TORCH + textwrap.dedent(code)],
                          capture_output=True, text=True, timeout=300)


def test_server_modules_import_without_torch():
    result = _run("""
        import pkgutil, importlib, sam2serve
        for mod in pkgutil.walk_packages(sam2serve.__path__, "sam2serve."):
            if mod.name == "sam2serve.engines.trt_engine":
                continue  # imports tensorrt lazily, not torch; covered by its own tests
            importlib.import_module(mod.name)
        print("ok")
    """)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


@needs_export_tools
def test_engines_run_without_torch(tiny_engine_dir):
    result = _run(f"""
        import numpy as np
        from sam2serve.engines import open_engine
        from sam2serve.images import synthetic_scene
        from sam2serve.preprocess import to_model_input
        engine = open_engine({str(tiny_engine_dir)!r}, providers=["CPUExecutionProvider"])
        m = engine.manifest
        feats = engine.encode(to_model_input(synthetic_scene(), m.image_size, m.pixel_mean, m.pixel_std))
        out = engine.decode(feats, np.array([[[100.0, 200.0]]], np.float32), np.ones((1, 1), np.float32))
        print(out.low_res_logits.shape)
    """)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "(1, 3, 256, 256)"


def test_export_command_explains_the_missing_extra():
    result = _run("""
        from sam2serve.cli import main
        raise SystemExit(main(["export", "--untrained"]))
    """)
    assert result.returncode == 2
    assert "sam2serve[export]" in result.stderr


def test_bench_measures_ours_without_torch():
    """`sam2serve bench` runs our generator in a child that unpickles `_run_ours` from its module: importing that
    module must not import torch, or ≈ 0.5 GB the server never loads would count in our peak RSS."""
    result = _run("""
        import sam2serve_export.bench as bench
        assert callable(bench._run_ours)
        print("ok")
    """)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
