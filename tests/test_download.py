"""Checkpoint downloads through a local stand-in for Meta's host: verified, resumable, never half-valid."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from dataclasses import replace

import pytest

from conftest import needs_export_tools
from httpfiles import FileHost

pytestmark = needs_export_tools
BODY = bytes(range(256)) * 4096  # 1 MiB, not a multiple of the read chunk
DIGEST = hashlib.sha256(BODY).hexdigest()


@pytest.fixture
def spec():
    from sam2serve_export.models import get_model_spec

    return replace(get_model_spec("sam2.1_hiera_tiny"), sha256=DIGEST, size=len(BODY))


def test_good_file_is_verified_and_published(spec, tmp_path):
    from sam2serve_export.download import download_checkpoint

    with FileHost({spec.filename: BODY}) as host:
        path = download_checkpoint(spec, tmp_path, base_url=host.base_url, progress=False)
        assert path.read_bytes() == BODY and path.name == "sam2.1_hiera_tiny.pt"
        assert not list(tmp_path.glob("*.part"))
        again = download_checkpoint(spec, tmp_path, base_url=host.base_url, progress=False)
        assert again == path and len(host.requests) == 1  # a verified copy is reused


def test_wrong_checksum_is_an_error_and_leaves_nothing(spec, tmp_path):
    from sam2serve_export.download import download_checkpoint
    from sam2serve_export.errors import ChecksumMismatchError

    with FileHost({spec.filename: BODY[:-1] + b"x"}) as host, pytest.raises(ChecksumMismatchError) as info:
        download_checkpoint(spec, tmp_path, base_url=host.base_url, progress=False)
    assert DIGEST in str(info.value) and "deleted" in str(info.value)
    assert list(tmp_path.iterdir()) == []


def test_truncated_transfer_keeps_only_a_part_file_then_resumes(spec, tmp_path):
    from sam2serve_export.download import download_checkpoint
    from sam2serve_export.errors import DownloadError

    with FileHost({spec.filename: BODY}, truncate_after=300_000) as host:
        with pytest.raises(DownloadError, match="resumes"):
            download_checkpoint(spec, tmp_path, base_url=host.base_url, progress=False)
        assert not (tmp_path / spec.filename).exists()
        assert (tmp_path / f"{spec.filename}.part").stat().st_size == 300_000
        host.truncate_after = None
        path = download_checkpoint(spec, tmp_path, base_url=host.base_url, progress=False)
    assert path.read_bytes() == BODY
    assert host.requests[-1]["range"] == "bytes=300000-"


def test_resume_restarts_when_the_host_ignores_ranges(spec, tmp_path):
    from sam2serve_export.download import download_checkpoint

    (tmp_path / f"{spec.filename}.part").write_bytes(b"stale bytes from another file")
    with FileHost({spec.filename: BODY}, support_range=False) as host:
        path = download_checkpoint(spec, tmp_path, base_url=host.base_url, progress=False)
    assert path.read_bytes() == BODY


def test_stale_final_file_is_replaced(spec, tmp_path):
    from sam2serve_export.download import download_checkpoint

    (tmp_path / spec.filename).write_bytes(b"not the checkpoint")
    with FileHost({spec.filename: BODY}) as host:
        assert download_checkpoint(spec, tmp_path, base_url=host.base_url, progress=False).read_bytes() == BODY


def test_missing_file_and_unreachable_host(spec, tmp_path):
    from sam2serve_export.download import download_checkpoint
    from sam2serve_export.errors import DownloadError

    with FileHost({}) as host, pytest.raises(DownloadError, match="HTTP 404"):
        download_checkpoint(spec, tmp_path, base_url=host.base_url, progress=False)
    with FileHost({}) as host:
        dead = host.base_url
    with pytest.raises(DownloadError, match="cannot reach"):
        download_checkpoint(spec, tmp_path, base_url=dead, progress=False)


def test_cli_download_keeps_the_official_pin(tmp_path):
    """A mirror serving anything but Meta's exact file is refused by the CLI, with exit code 2."""
    with FileHost({"sam2.1_hiera_tiny.pt": BODY}) as host:
        result = subprocess.run(
            [sys.executable, "-m", "sam2serve.cli", "export", "--download", "--base-url", host.base_url,
             "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "engines"), "--quiet"],
            capture_output=True, text=True, timeout=300,
        )
    assert result.returncode == 2, result.stderr
    assert "checksum mismatch" in result.stderr and "7402e0d864fa" in result.stderr
    assert not (tmp_path / "engines").exists() and not (tmp_path / "cache" / "sam2.1_hiera_tiny.pt").exists()


def test_cli_falls_back_to_untrained_only_when_the_host_is_unreachable(tmp_path):
    with FileHost({}) as host:
        dead = host.base_url
    result = subprocess.run(
        [sys.executable, "-m", "sam2serve.cli", "export", "--download-or-untrained", "--base-url", dead,
         "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "engines"), "--quiet", "--json"],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr
    assert "FALLING BACK TO UNTRAINED WEIGHTS" in result.stderr and "MEANINGLESS" in result.stderr
    assert '"weights": "untrained"' in result.stdout.splitlines()[-1]
