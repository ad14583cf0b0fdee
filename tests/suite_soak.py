"""Soak suite (a script with figures, not a timed test): minutes of steady mixed gRPC traffic against a real
`sam2serve serve` process, its RSS sampled from /proc every second.

Traffic: one job always in flight (Submit → WatchStatus → GetResult, points_per_side 1), and a steady stream
of cheap calls at `--rate` per second cycling through GetStatus, GetInfo, a finished job's WatchStatus,
Submit+Cancel, a refused parameter (INVALID_ARGUMENT) and an unknown id (NOT_FOUND). After one warm-up job the
clock starts. A job's working set (the encoder's activations, ~400 MiB) comes and goes, so growth is measured
between like moments: the RSS right after each job ended (median of the last three minus median of the first
three, fewer on a short run, the first being the end of the warm-up); the per-second samples give the range.

Checks: RSS growth below `--max-growth-mib`; no INTERNAL/UNKNOWN; every job COMPLETED; the cheap calls' codes
the expected ones (RESOURCE_EXHAUSTED allowed for Submit when the queue is full).

    python tests/suite_soak.py --engines engines/sam2.1_hiera_tiny --seconds 300      # starts its own server
    python tests/suite_soak.py --short --server 127.0.0.1:50051 --server-pid 1234
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable

import grpc
import numpy as np

from grpc_harness import quick_request
from sam2serve.v1 import sam2serve_pb2 as pb
from suite_common import (
    Checks,
    ServerProcess,
    add_server_arguments,
    channel,
    code_name,
    codes_text,
    machine,
    quantiles_ms,
    rss_mib,
    stub,
    table,
    wait_serving,
)

State = pb.RequestStatus
EXPECTED = {"GetStatus": {"OK"}, "GetInfo": {"OK"}, "WatchStatus": {"OK"},
            "Submit+Cancel": {"OK", "RESOURCE_EXHAUSTED"}, "bad parameter": {"INVALID_ARGUMENT"},
            "unknown id": {"NOT_FOUND"}}


def run_job(s, points_per_side: int) -> tuple[str, str]:  # type: ignore[no-untyped-def]
    """(final state, request id) of one job, Submit → WatchStatus → GetResult."""
    request_id = s.Submit(quick_request(points_per_side=points_per_side, return_individual_masks=False),
                          timeout=60).request_id
    final = None
    for status in s.WatchStatus(pb.StatusRequest(request_id=request_id), timeout=1800):
        final = status
    state = State.State.Name(final.state) if final is not None else "none"
    if state == "COMPLETED":
        s.GetResult(pb.ResultRequest(request_id=request_id), timeout=60)
    return state, request_id


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_server_arguments(parser)
    parser.add_argument("--seconds", type=float, default=0, help="soak duration (default 300; short 12)")
    parser.add_argument("--rate", type=float, default=20.0, help="cheap calls per second")
    parser.add_argument("--max-growth-mib", type=float, default=0, help="RSS growth bound (default 64; short 48)")
    parser.add_argument("--points-per-side", type=int, default=1)
    args = parser.parse_args(argv)
    seconds = args.seconds or (12 if args.short else 300)
    max_growth = args.max_growth_mib or (48 if args.short else 64)
    checks = Checks()
    server = None
    address, pid = args.server, args.server_pid
    if not address:
        server = ServerProcess(args.engines, "--workers", "1", "--queue-size", "4")
        address, pid = server.address, server.pid
    if not pid:
        raise SystemExit("--server-pid is needed with --server: the soak samples the server's RSS")
    samples: list[tuple[float, float]] = []
    boundaries: list[tuple[float, float]] = []  # (s, RSS MiB) right after each job ended
    job_states: Counter[str] = Counter()
    calls: dict[str, Counter[str]] = {name: Counter() for name in EXPECTED}
    latencies: list[float] = []
    try:
        wait_serving(address)
        with channel(address) as ch:
            s = stub(ch)
            state, done = run_job(s, args.points_per_side)  # warm-up: the first job's allocations are not growth
            checks.check(state == "COMPLETED", f"warm-up job {state}")
            stop = threading.Event()
            start = time.monotonic()
            boundaries.append((0.0, rss_mib(pid)))

            def jobs() -> None:
                with channel(address) as jch:
                    js = stub(jch)
                    while not stop.is_set():
                        job_states[run_job(js, args.points_per_side)[0]] += 1
                        boundaries.append((time.monotonic() - start, rss_mib(pid)))

            def sampler() -> None:
                while not stop.wait(1.0):
                    samples.append((time.monotonic() - start, rss_mib(pid)))

            cheap: list[tuple[str, Callable[[], object]]] = [
                ("GetStatus", lambda: s.GetStatus(pb.StatusRequest(request_id=done, logs=True), timeout=30)),
                ("GetInfo", lambda: s.GetInfo(pb.GetInfoRequest(), timeout=30)),
                ("WatchStatus", lambda: list(s.WatchStatus(pb.StatusRequest(request_id=done), timeout=30))),
                ("Submit+Cancel", lambda: s.Cancel(pb.CancelRequest(request_id=s.Submit(
                    quick_request(points_per_side=2), timeout=30).request_id), timeout=30)),
                ("bad parameter", lambda: s.AutoSegment(quick_request(pred_iou_thresh=float("nan")), timeout=30)),
                ("unknown id", lambda: s.GetResult(pb.ResultRequest(request_id="f" * 32), timeout=30)),
            ]
            samples.append((0.0, rss_mib(pid)))
            threads = [threading.Thread(target=jobs), threading.Thread(target=sampler)]
            for t in threads:
                t.start()
            i = 0
            while time.monotonic() - start < seconds:
                name, call = cheap[i % len(cheap)]
                t0 = time.perf_counter()
                try:
                    call()
                    calls[name]["OK"] += 1
                except grpc.RpcError as e:
                    calls[name][code_name(e)] += 1
                latencies.append(time.perf_counter() - t0)
                i += 1
                time.sleep(max(0.0, i / args.rate - (time.monotonic() - start)))  # --rate calls per second
            stop.set()
            for t in threads:
                t.join(1800)
            samples.append((time.monotonic() - start, rss_mib(pid)))
    finally:
        if server is not None:
            rc = server.terminate()
            checks.check(rc == 0, f"server exit code {rc}")
            server.kill()

    rss = np.array([r for _, r in samples])
    after_jobs = np.array([r for _, r in boundaries])
    k = max(1, min(3, len(after_jobs) // 2))  # the first and last k never overlap
    first, last = float(np.median(after_jobs[:k])), float(np.median(after_jobs[-k:]))
    growth = last - first
    checks.check(growth < max_growth, f"RSS grew {growth:.1f} MiB (bound {max_growth} MiB)")
    checks.check(set(job_states) == {"COMPLETED"} and job_states["COMPLETED"] > 0, f"jobs: {dict(job_states)}")
    for name, seen in calls.items():
        checks.check(set(seen) <= EXPECTED[name] and sum(seen.values()) > 0, f"{name}: {codes_text(seen)}")
    p50, p99, worst = quantiles_ms(latencies)
    total = sum(sum(c.values()) for c in calls.values())
    print(f"\n### Soak: {samples[-1][0]:.0f} s of steady traffic ({args.rate:g} cheap calls/s + one job always in "
          f"flight, points_per_side {args.points_per_side})\n")
    print(table(("figure", "value"), [
        (f"server RSS after a job ended: first {k} (median) MiB", first),
        (f"server RSS after a job ended: last {k} (median) MiB", last),
        ("server RSS growth MiB", growth),
        ("server RSS, every second: min / max MiB", f"{rss.min():.0f} / {rss.max():.0f}"),
        ("RSS samples (every second / after a job)", f"{len(rss)} / {len(after_jobs)}"),
        ("jobs completed (after the warm-up)", job_states["COMPLETED"]),
        ("cheap calls", total),
        ("cheap calls p50 / p99 / max ms", f"{p50:.1f} / {p99:.1f} / {worst:.0f}"),
        *((f"codes: {name}", codes_text(seen)) for name, seen in calls.items()),
    ]))
    step = max(1, len(samples) // 10)
    print("\nRSS over time (s: MiB): " + ", ".join(f"{t:.0f}: {r:.0f}" for t, r in samples[::step]))
    print("RSS after each job (s: MiB): " + ", ".join(f"{t:.0f}: {r:.0f}" for t, r in boundaries))
    print(f"\nmachine: {machine()}")
    return checks.exit_code()


if __name__ == "__main__":
    sys.exit(main())
