"""Starting `sam2serve serve` when it cannot start: one line saying what to change, exit code 2, no traceback."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

from conftest import needs_export_tools


def serve(env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "sam2serve.cli", "serve"], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "SAM2SERVE_HOST": "127.0.0.1", **env})


def test_a_metrics_port_in_use_is_one_line_before_the_engines_load(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        # No engines at this path: the port is checked before they would be loaded.
        result = serve({"SAM2SERVE_METRICS_PORT": str(port), "SAM2SERVE_ENGINES": str(tmp_path / "absent")})
    assert result.returncode == 2, result.stderr
    assert f"error: cannot serve metrics on 127.0.0.1:{port}" in result.stderr and "--metrics-port" in result.stderr
    assert "Traceback" not in result.stderr


@needs_export_tools
def test_a_grpc_port_in_use_is_one_line(tiny_engine_dir):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = serve({"SAM2SERVE_PORT": str(port), "SAM2SERVE_METRICS_PORT": "0",
                        "SAM2SERVE_ENGINES": str(tiny_engine_dir)})
    assert result.returncode == 2, result.stderr
    assert f"error: cannot listen on 127.0.0.1:{port} for gRPC" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr

