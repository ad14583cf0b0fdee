"""The reliability suites' short modes (tests/suite_*.py), each against a real `sam2serve serve` process with
the untrained tiny engines. The scripts check their own figures (no INTERNAL/UNKNOWN, p99 and RSS-growth
bounds, every hostile case's code, CANCELLED/UNAVAILABLE and exit code 0 on an expiring drain) and exit 1 when
a check fails; their full modes produce docs/reliability.md's figures."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import needs_export_tools
from suite_common import ServerProcess

pytestmark = needs_export_tools
TESTS = Path(__file__).resolve().parent


def run_suite(name: str, *args: str, timeout_s: float = 600) -> str:
    completed = subprocess.run([sys.executable, str(TESTS / name), "--short", *args], capture_output=True, text=True,
                               timeout=timeout_s, env=os.environ)
    output = completed.stdout + completed.stderr
    print(output)
    assert completed.returncode == 0, f"{name} failed:\n{output[-6000:]}"
    return output


@pytest.fixture(scope="module")
def server(tiny_engine_dir):
    """One server for the suites that do not stop it: one worker, a queue of 2, a bound of 100 status streams."""
    s = ServerProcess(tiny_engine_dir, "--workers", "1", "--queue-size", "2", "--max-status-streams", "100")
    yield s
    rc = s.terminate()
    s.kill()
    assert rc == 0, s.output()[-4000:]


def test_load_short(server):
    output = run_suite("suite_load.py", "--server", server.address, "--queue-size", "2")
    assert "Submit RESOURCE_EXHAUSTED" in output  # 8 clients at once over a queue of 2


def test_hostile_corpus(server):
    output = run_suite("suite_hostile.py", "--server", server.address, "--no-upstream")
    assert "as expected" in output


def test_streams_short(server):
    output = run_suite("suite_streams.py", "--server", server.address, "--server-pid", str(server.pid))
    assert "OK CANCELLED 100" in output and "RESOURCE_EXHAUSTED 10" in output


def test_soak_short(server):
    run_suite("suite_soak.py", "--server", server.address, "--server-pid", str(server.pid))


def test_drain_short(tiny_engine_dir):
    output = run_suite("suite_drain.py", "--engines", str(tiny_engine_dir))
    assert "exit code 0" in output
