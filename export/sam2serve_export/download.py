"""Fetch an official checkpoint: resumable, verified against its pinned SHA-256, atomically published.

The file only ever appears under its final name after its digest matched; until then bytes live in
`<name>.part`, which a later run resumes (HTTP Range) when the host supports it.
"""

from __future__ import annotations

import http.client
import os
import urllib.error
import urllib.request
from pathlib import Path

from tqdm import tqdm

from sam2serve.engines.manifest import sha256_file

from .errors import ChecksumMismatchError, DownloadError
from .models import ModelSpec

CHUNK_BYTES = 1 << 20
TIMEOUT_S = 60.0




def download_checkpoint(
    spec: ModelSpec,
    dest_dir: Path,
    base_url: str | None = None,
    expected_sha256: str | None = None,
    progress: bool = True,
) -> Path:
    """Return the path of a verified copy of `spec`'s checkpoint in `dest_dir`, downloading what is missing.

    `base_url` lets a mirror (or a test server) stand in for Meta's host; the digest stays pinned.
    """
    expected = (expected_sha256 or spec.sha256).lower()
    dest_dir.mkdir(parents=True, exist_ok=True)
    target = dest_dir / spec.filename
    if target.exists():
        actual = sha256_file(target)
        if actual == expected:
            return target
        target.unlink()  # a stale or foreign file under the final name is never trusted

    part = target.with_name(target.name + ".part")
    url = spec.url(base_url)
    _fetch_into(url, part, progress=progress)
    actual = sha256_file(part)
    if actual != expected:
        part.unlink()
        raise ChecksumMismatchError(
            f"checksum mismatch for {url}: expected SHA-256 {expected}, got {actual}; "
            "the download was deleted. The mirror may serve a different file."
        )
    os.replace(part, target)
    return target


def _fetch_into(url: str, part: Path, progress: bool) -> None:
    offset = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"User-Agent": "sam2serve-export"})
    if offset:
        request.add_header("Range", f"bytes={offset}-")
    try:
        response = urllib.request.urlopen(request, timeout=TIMEOUT_S)
    except urllib.error.HTTPError as e:
        if e.code == 416 and offset:  # the part is already complete (or longer than the file)
            return
        raise DownloadError(f"download of {url} failed: HTTP {e.code} {e.reason}") from None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise DownloadError(f"cannot reach {url}: {reason}") from None

    with response:
        resumed = offset > 0 and response.status == 206
        if not resumed:
            offset = 0
        length = response.headers.get("Content-Length")
        remaining = int(length) if length is not None else None
        total = offset + remaining if remaining is not None else None
        received = 0
        with (
            open(part, "ab" if resumed else "wb") as out,
            tqdm(total=total, initial=offset, unit="B", unit_scale=True, desc=part.stem,
                 disable=not progress) as bar,
        ):
            try:
                for block in iter(lambda: response.read(CHUNK_BYTES), b""):
                    out.write(block)
                    received += len(block)
                    bar.update(len(block))
            except (http.client.IncompleteRead, OSError) as e:
                raise DownloadError(
                    f"download of {url} broke off after {offset + received} bytes ({e}); "
                    f"the partial file {part} is kept and the next run resumes it"
                ) from None
    if remaining is not None and received < remaining:
        raise DownloadError(
            f"download of {url} ended early: got {offset + received} of {total} bytes; "
            f"the partial file {part} is kept and the next run resumes it"
        )
