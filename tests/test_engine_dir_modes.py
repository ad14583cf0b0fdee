"""An exported engine directory is readable by other uids: the image serves it as 10001, mounted read-only.

`sam2serve export` used to build in a tempfile.mkdtemp directory (always 0700) and rename it into place, so
`docker run -v engines/<model>:/engines/<model>:ro` of a root export gave the server PermissionError on
manifest.json. The directory now gets the mode mkdir gives (0777 less the umask), as its files do.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import tempfile
from pathlib import Path

import pytest

from conftest import needs_export_tools

pytestmark = needs_export_tools
SERVING_UID = 10001  # the image's USER and the chart's runAsUser


def current_umask() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("Umask:"):
            return int(line.split()[1], 8)
    raise AssertionError("no Umask in /proc/self/status")


def test_engine_dir_and_files_have_the_modes_of_the_umask(tiny_engine_dir):
    umask = current_umask()
    assert stat.S_IMODE(tiny_engine_dir.stat().st_mode) == 0o777 & ~umask
    files = list(tiny_engine_dir.iterdir())
    assert {"manifest.json", "encoder.onnx", "decoder.onnx"} <= {f.name for f in files}
    for f in files:
        assert f.is_file(), f
        assert stat.S_IMODE(f.stat().st_mode) == 0o666 & ~umask, f


def test_another_uid_reads_a_root_export(tiny_engine_dir):
    """What the container does: uid 10001 opens every file of an export made by root (umask 022)."""
    if os.geteuid() != 0:
        pytest.skip("needs root, to export as root and read as another uid")
    if current_umask() & 0o055:
        pytest.skip("the umask withholds read access from others; that is the exporter's choice")
    # A world-traversable copy (hard links: same inodes, same modes) outside pytest's 0700 tmp directories.
    volume = Path(tempfile.mkdtemp(prefix="sam2serve-engines-"))
    try:
        volume.chmod(0o755)
        served = volume / tiny_engine_dir.name
        shutil.copytree(tiny_engine_dir, served, copy_function=os.link)
        script = 'n=0; for f in "$1"/*; do head -c 1 "$f" >/dev/null || exit 1; n=$((n+1)); done; echo $n'
        result = subprocess.run(["/bin/sh", "-c", script, "sh", str(served)], user=SERVING_UID, group=SERVING_UID,
                                extra_groups=[], capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        assert int(result.stdout) == len(list(served.iterdir()))
    finally:
        shutil.rmtree(volume)
