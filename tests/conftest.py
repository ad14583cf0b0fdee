"""Shared fixtures: one untrained hiera-tiny export per test session (≈ 40 s on 2 cores), a private
redis-server per module that asks for one, a throwaway TLS certificate authority."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

# Real photos sit beside the checkout (../shared/images); SAM2SERVE_TEST_IMAGES points elsewhere (a worktree).
SHARED_IMAGES = Path(os.environ.get("SAM2SERVE_TEST_IMAGES")
                     or Path(__file__).resolve().parents[2] / "shared" / "images")
IN_CI = os.environ.get("CI", "").lower() == "true"
HAVE_EXPORT_TOOLS = all(importlib.util.find_spec(m) is not None for m in ("torch", "sam2", "onnx"))
EXPORT_TOOLS = "the export extra (torch, Meta's sam2, onnx) is not installed"
# CI installs the export extra, so there the tests run, and fail where it is missing, instead of skipping.
needs_export_tools = pytest.mark.skipif(not HAVE_EXPORT_TOOLS and not IN_CI, reason=EXPORT_TOOLS)
REDIS_SERVER = shutil.which("redis-server")
needs_redis = pytest.mark.skipif(REDIS_SERVER is None and not IN_CI, reason="redis-server is not installed "
                                 "(.ci/setup installs Debian's redis-server when run as root)")
TINY = "sam2.1_hiera_tiny"
SEED = 0


def require(available: bool, reason: str) -> None:
    """A tool CI installs is absent: skip, except in CI (`CI=true`), which installs it: there it fails."""
    if available:
        return
    if IN_CI:
        pytest.fail(f"{reason} (CI=true: .ci/setup installs it, so its absence is an error)", pytrace=False)
    pytest.skip(reason, allow_module_level=True)


def import_required(module: str, reason: str) -> Any:
    """The module, imported; when it is absent, `require` decides (a skip, or a failure in CI)."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        require(False, f"{reason}: {e}")
        raise  # unreachable: require skipped or failed


def shared_image(name: str) -> Path:
    path = SHARED_IMAGES / name
    if not path.is_file():
        pytest.skip(f"real test image {path} is absent (../shared/images is not part of this checkout)")
    return path


@pytest.fixture(scope="session")
def tiny_export(tmp_path_factory: pytest.TempPathFactory, worker_id: str):
    """(engine dir, torch model) of an untrained sam2.1_hiera_tiny with seed 0.

    Under pytest-xdist the workers share one export (a file lock; the first one builds it): exporting is the
    longest fixture of the suite, and the untrained model is deterministic, so the others only rebuild the
    torch model from the seed (the parity tests would fail if it differed from the engines')."""
    require(HAVE_EXPORT_TOOLS, EXPORT_TOOLS)
    from sam2serve_export.build import build_engines
    from sam2serve_export.models import get_model_spec
    from sam2serve_export.weights import WeightsChoice, load_model

    spec, weights = get_model_spec(TINY), WeightsChoice(untrained_seed=SEED)
    if worker_id == "master":  # not under xdist
        out = tmp_path_factory.mktemp("engines") / TINY
        return out, build_engines(spec, out, weights, progress=False)[1]
    from filelock import FileLock

    shared = tmp_path_factory.getbasetemp().parent / "shared-engines"  # common to this run's workers
    shared.mkdir(exist_ok=True)
    out = shared / TINY
    with FileLock(str(shared / "export.lock")):
        if not (out / "manifest.json").is_file():
            return out, build_engines(spec, out, weights, progress=False)[1]
    return out, load_model(spec, weights, progress=False)[0]


@pytest.fixture(scope="session")
def tiny_engine_dir(tiny_export) -> Path:
    return tiny_export[0]


@pytest.fixture(scope="session")
def tiny_model(tiny_export):
    return tiny_export[1]


@pytest.fixture(scope="session")
def tiny_engine(tiny_engine_dir):
    """One opened ONNX engine shared by the in-process servers of the service tests."""
    from sam2serve.engines.onnx_engine import OnnxEngine

    return OnnxEngine(tiny_engine_dir, providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A private redis-server on a unix socket (no port to collide with), without persistence."""
    import redis

    require(REDIS_SERVER is not None, "redis-server (Debian's redis-server) is not installed")
    directory = tmp_path_factory.mktemp("redis")
    socket_path = directory / "redis.sock"
    process = subprocess.Popen([REDIS_SERVER, "--port", "0", "--unixsocket", str(socket_path), "--save", "",
                                "--appendonly", "no", "--dir", str(directory)], stdout=subprocess.DEVNULL)
    url = f"unix://{socket_path}"
    deadline = time.monotonic() + 20
    while True:  # wait until it answers (it starts in milliseconds; the loop bounds a slow machine)
        try:
            if redis.Redis.from_url(url).ping():
                break
        except redis.ConnectionError:
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("redis-server did not start") from None
            time.sleep(0.05)
    yield url
    process.terminate()
    process.wait(10)


@dataclass(frozen=True)
class TlsFiles:
    ca: Path  # PEM of the throwaway certificate authority (SSL_CERT_FILE, NODE_EXTRA_CA_CERTS)
    cert: Path  # the server's certificate for 127.0.0.1 and localhost
    key: Path


@pytest.fixture(scope="session")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    trustme = import_required("trustme", "trustme is not installed (the dev extra)")
    ca = trustme.CA()
    issued = ca.issue_cert("127.0.0.1", "localhost")
    directory = tmp_path_factory.mktemp("tls")
    files = TlsFiles(directory / "ca.pem", directory / "cert.pem", directory / "key.pem")
    ca.cert_pem.write_to_path(files.ca)
    issued.cert_chain_pems[0].write_to_path(files.cert)
    issued.private_key_pem.write_to_path(files.key)
    return files
