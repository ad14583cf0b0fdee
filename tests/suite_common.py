"""What the reliability suites (tests/suite_*.py: scripts with figures, not timed tests) share: a real
`sam2serve serve` process on a free loopback port, its RSS, latency percentiles, markdown tables and checks
that make the script exit non-zero.

Each suite starts its own server from `--engines DIR`, or uses a running one (`--server HOST:PORT`, with
`--server-pid PID` where it samples RSS), which is how tests/test_suites_short.py runs their short modes
against one server.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from sam2serve.v1 import sam2serve_pb2 as pb
from sam2serve.v1 import sam2serve_pb2_grpc as pb_grpc

CHANNEL_OPTIONS = [("grpc.max_receive_message_length", 256 << 20), ("grpc.max_send_message_length", 256 << 20)]
BAD_CODES = (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN)  # never an answer to a client, whatever it sent


class ServerProcess:
    """`sam2serve serve` on 127.0.0.1, a free port; its output goes to `log_path` (read on failure)."""

    def __init__(self, engines: str | Path, *args: str, log_path: Path | None = None, start_timeout_s: float = 300):
        command = [sys.executable, "-m", "sam2serve.cli", "serve", "--engines", str(engines), "--host",
                   "127.0.0.1", "--port", "0", "--metrics-port", "-1", "--log-level", "WARNING", *args]
        self.log_path = log_path or Path(f"/tmp/sam2serve-suite-{os.getpid()}-{time.monotonic_ns()}.log")
        self._log = self.log_path.open("w")
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.pid = self.process.pid
        self.port = 0
        found = threading.Event()

        def pump() -> None:  # the server's output, to the log; the port from its "listening" line
            assert self.process.stdout is not None
            for line in self.process.stdout:
                self._log.write(line)
                self._log.flush()
                m = re.search(r"listening on 127\.0\.0\.1:(\d+)", line)
                if m and not found.is_set():
                    self.port = int(m.group(1))
                    found.set()
            found.set()

        self._pump = threading.Thread(target=pump, daemon=True)
        self._pump.start()
        found.wait(start_timeout_s)
        if not self.port:
            self.kill()
            raise SystemExit(f"the server did not start; its output:\n{self.output()}")
        self.address = f"127.0.0.1:{self.port}"

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def terminate(self, timeout_s: float = 120) -> int:
        """SIGTERM, then the exit code (killed after `timeout_s`: -9)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()
            return -9

    def kill(self) -> None:
        """Killed if still running; its log is removed if it exited 0 (kept, and named, otherwise)."""
        if self.process.poll() is None:
            self.process.kill()
        rc = self.process.wait()
        self._pump.join(5)
        self._log.close()
        if rc == 0:
            self.log_path.unlink(missing_ok=True)
        else:
            print(f"server log (exit code {rc}): {self.log_path}", file=sys.stderr)


def rss_mib(pid: int) -> float:
    """Resident set size of a process (Linux /proc), in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def channel(address: str) -> grpc.Channel:
    return grpc.insecure_channel(address, options=CHANNEL_OPTIONS)


def wait_serving(address: str, timeout_s: float = 300) -> None:
    with channel(address) as ch:
        grpc.channel_ready_future(ch).result(timeout=timeout_s)
        deadline = time.monotonic() + timeout_s
        health = health_pb2_grpc.HealthStub(ch)
        while health.Check(health_pb2.HealthCheckRequest(), timeout=30).status != \
                health_pb2.HealthCheckResponse.SERVING:
            if time.monotonic() > deadline:
                raise SystemExit(f"{address} never reported SERVING")
            time.sleep(0.2)


def stub(ch: grpc.Channel) -> pb_grpc.AutoSegmentServiceStub:
    return pb_grpc.AutoSegmentServiceStub(ch)


def quantiles_ms(seconds: Sequence[float]) -> tuple[float, float, float]:
    """(p50, p99, max) in milliseconds; NaN for no samples."""
    if not seconds:
        return float("nan"), float("nan"), float("nan")
    a = np.asarray(seconds) * 1000.0
    return float(np.percentile(a, 50)), float(np.percentile(a, 99)), float(a.max())


def codes_text(codes: Counter[str]) -> str:
    return ", ".join(f"{name} {n}" for name, n in sorted(codes.items())) or "-"


def table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    def cell(v: object) -> str:
        if isinstance(v, float):
            return "-" if v != v else f"{v:.1f}" if abs(v) >= 10 else f"{v:.2f}"
        return str(v).replace("|", "\\|")

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def machine() -> str:
    load = Path("/proc/loadavg").read_text().split()[:3]
    return f"{os.cpu_count()} CPUs, load average {' '.join(load)} (shared machine: other processes were running)"


@dataclass
class Checks:
    """Assertions that are all evaluated and reported; the script exits 1 if any failed."""

    failures: list[str] = field(default_factory=list)

    def check(self, ok: bool, what: str) -> bool:
        if not ok:
            self.failures.append(what)
            print(f"FAILED: {what}", flush=True)
        return ok

    def exit_code(self) -> int:
        if self.failures:
            print(f"\n{len(self.failures)} check(s) failed:\n" + "\n".join(f"- {f}" for f in self.failures))
            return 1
        print("\nall checks passed")
        return 0


def add_server_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--engines", default="engines/sam2.1_hiera_tiny", help="engine dir of the server to start")
    parser.add_argument("--server", default="", help="HOST:PORT of a running server instead of starting one")
    parser.add_argument("--server-pid", type=int, default=0, help="its pid (RSS is sampled from /proc)")
    parser.add_argument("--short", action="store_true", help="the short version CI runs")


def code_name(e: grpc.RpcError) -> str:
    code = e.code()  # type: ignore[attr-defined]
    return code.name if isinstance(code, grpc.StatusCode) else str(code)


def is_state(status: pb.RequestStatus, state: int) -> bool:
    return bool(status.state == state)
