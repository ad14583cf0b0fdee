"""Load suite (a script with figures, not a timed test): 1/4/16/64 concurrent gRPC clients against a real
`sam2serve serve` process.

Per level, two phases:
- jobs: every client at once does Submit → WatchStatus to the end → GetResult of a small AutoSegment request
  (points_per_side 1 by default: the cost is the image encoder). Beyond the queue the server answers
  RESOURCE_EXHAUSTED, which is expected and counted. Figures: jobs completed per second, p50/p99/max latency
  from Submit to the result, every status code seen.
- cheap calls: every client calls GetStatus `--calls` times on a finished job: calls per second and p50/p99
  (the event loop and the transport, not the engine).

Checks (exit 1 if one fails): no INTERNAL/UNKNOWN code anywhere; only OK and RESOURCE_EXHAUSTED (with the
queue bound in its message) at Submit; every accepted job COMPLETED with a result; RESOURCE_EXHAUSTED seen
once the clients outnumber the queue and the workers; GetStatus p99 below `--max-p99-ms`.

    python tests/suite_load.py --engines engines/sam2.1_hiera_tiny           # starts its own server
    python tests/suite_load.py --short --server 127.0.0.1:50051 --queue-size 2
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from collections import Counter

import grpc

from grpc_harness import quick_request
from sam2serve.v1 import sam2serve_pb2 as pb
from suite_common import (
    BAD_CODES,
    Checks,
    ServerProcess,
    add_server_arguments,
    channel,
    code_name,
    codes_text,
    machine,
    quantiles_ms,
    stub,
    table,
    wait_serving,
)

State = pb.RequestStatus


def job_level(address: str, clients: int, points_per_side: int) -> dict[str, object]:
    codes: Counter[str] = Counter()
    latencies: list[float] = []
    states: Counter[str] = Counter()
    messages: list[str] = []
    done: list[str] = []  # ids of completed jobs
    lock = threading.Lock()
    start = threading.Barrier(clients + 1)
    request = quick_request(points_per_side=points_per_side, return_individual_masks=False)

    def client() -> None:
        with channel(address) as ch:
            s = stub(ch)
            start.wait()
            t0 = time.perf_counter()
            try:
                request_id = s.Submit(request, timeout=60).request_id
            except grpc.RpcError as e:
                with lock:
                    codes[f"Submit {code_name(e)}"] += 1
                    messages.append(e.details() or "")
                return
            with lock:
                codes["Submit OK"] += 1
            final = None
            for status in s.WatchStatus(pb.StatusRequest(request_id=request_id), timeout=1800):
                final = status
            state = State.State.Name(final.state) if final is not None else "none"
            try:
                result = s.GetResult(pb.ResultRequest(request_id=request_id), timeout=60)
                with lock:
                    codes["GetResult OK"] += 1
                    states[state] += 1
                    done.append(request_id)
                    if result.total_masks >= 1:
                        latencies.append(time.perf_counter() - t0)
                    else:
                        states["COMPLETED without a mask"] += 1
            except grpc.RpcError as e:
                with lock:
                    codes[f"GetResult {code_name(e)}"] += 1
                    states[state] += 1

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    return {"codes": codes, "latencies": latencies, "states": states, "wall": wall, "messages": messages,
            "done": done}


def cheap_level(address: str, clients: int, calls: int, request_id: str) -> dict[str, object]:
    codes: Counter[str] = Counter()
    latencies: list[float] = []
    lock = threading.Lock()
    start = threading.Barrier(clients + 1)

    def client() -> None:
        mine: list[float] = []
        seen: Counter[str] = Counter()
        with channel(address) as ch:
            s = stub(ch)
            s.GetInfo(pb.GetInfoRequest(), timeout=30)  # connected before the clock starts
            start.wait()
            for _ in range(calls):
                t0 = time.perf_counter()
                try:
                    s.GetStatus(pb.StatusRequest(request_id=request_id), timeout=30)
                    seen["OK"] += 1
                    mine.append(time.perf_counter() - t0)
                except grpc.RpcError as e:
                    seen[code_name(e)] += 1
        with lock:
            latencies.extend(mine)
            codes.update(seen)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    return {"codes": codes, "latencies": latencies, "wall": time.perf_counter() - t0}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_server_arguments(parser)
    parser.add_argument("--clients", default="", help="comma-separated levels (default 1,4,16,64; short 1,8)")
    parser.add_argument("--queue-size", type=int, default=0, help="the server's --queue-size (default 8; short 2)")
    parser.add_argument("--workers", type=int, default=1, help="the server's --workers")
    parser.add_argument("--points-per-side", type=int, default=1)
    parser.add_argument("--calls", type=int, default=0, help="GetStatus calls per client (default 200; short 40)")
    parser.add_argument("--max-p99-ms", type=float, default=3000.0, help="bound on GetStatus p99")
    args = parser.parse_args(argv)
    levels = [int(c) for c in (args.clients or ("1,8" if args.short else "1,4,16,64")).split(",")]
    queue_size = args.queue_size or (2 if args.short else 8)
    calls = args.calls or (40 if args.short else 200)
    checks = Checks()

    server = None
    if args.server:
        address = args.server
        command_server = f"the running server {address} (queue size {queue_size}, workers {args.workers})"
    else:
        server = ServerProcess(args.engines, "--queue-size", str(queue_size), "--workers", str(args.workers))
        address = server.address
        command_server = (f"`sam2serve serve --engines {args.engines} --queue-size {queue_size} "
                          f"--workers {args.workers}`")
    try:
        wait_serving(address)
        done = ""  # a finished job for GetStatus to look at
        job_rows, cheap_rows = [], []
        for clients in levels:
            jobs = job_level(address, clients, args.points_per_side)
            codes, states = jobs["codes"], jobs["states"]
            assert isinstance(codes, Counter) and isinstance(states, Counter)
            lat = jobs["latencies"]
            assert isinstance(lat, list)
            p50, p99, worst = quantiles_ms(lat)
            wall = float(jobs["wall"])  # type: ignore[arg-type]
            job_rows.append((clients, codes["Submit OK"], codes["Submit RESOURCE_EXHAUSTED"], codes_text(codes),
                             wall, len(lat) / wall, p50, p99, worst))
            bad = [c for c in codes if any(c.endswith(b.name) for b in BAD_CODES)]
            checks.check(not bad, f"{clients} clients: INTERNAL/UNKNOWN codes: {codes_text(codes)}")
            other = {c for c in codes if c not in ("Submit OK", "Submit RESOURCE_EXHAUSTED", "GetResult OK")}
            checks.check(not other, f"{clients} clients: unexpected codes {other}")
            checks.check(states.get("COMPLETED", 0) == codes["Submit OK"] == len(lat),
                         f"{clients} clients: accepted {codes['Submit OK']}, completed {dict(states)}, "
                         f"with a mask {len(lat)}")
            messages = jobs["messages"]
            assert isinstance(messages, list)
            checks.check(all(f"{queue_size}" in m and "queue" in m for m in messages),
                         f"{clients} clients: RESOURCE_EXHAUSTED without the queue bound: {messages[:2]}")
            if clients > queue_size + args.workers:
                checks.check(codes["Submit RESOURCE_EXHAUSTED"] > 0,
                             f"{clients} clients over a queue of {queue_size}: no RESOURCE_EXHAUSTED")
            finished = jobs["done"]
            assert isinstance(finished, list)
            done = done or (finished[0] if finished else "0" * 32)
            cheap = cheap_level(address, clients, calls, done)
            ccodes = cheap["codes"]
            assert isinstance(ccodes, Counter)
            clat = cheap["latencies"]
            assert isinstance(clat, list)
            cp50, cp99, cworst = quantiles_ms(clat)
            cwall = float(cheap["wall"])  # type: ignore[arg-type]
            cheap_rows.append((clients, sum(ccodes.values()), len(clat) / cwall, cp50, cp99, cworst,
                               codes_text(ccodes)))
            checks.check(set(ccodes) == {"OK"}, f"GetStatus at {clients} clients: {codes_text(ccodes)}")
            checks.check(cp99 < args.max_p99_ms, f"GetStatus p99 {cp99:.0f} ms ≥ {args.max_p99_ms:.0f} ms")
    finally:
        if server is not None:
            rc = server.terminate()
            checks.check(rc == 0, f"server exit code {rc}")
            server.kill()

    print(f"\n### Load: Submit → WatchStatus → GetResult, points_per_side {args.points_per_side}, against "
          f"{command_server}\n")
    print(table(("clients", "accepted", "RESOURCE_EXHAUSTED", "codes", "wall s", "jobs/s", "p50 ms", "p99 ms",
                 "max ms"), job_rows))
    print(f"\n### Load: GetStatus, {calls} calls per client\n")
    print(table(("clients", "calls", "calls/s", "p50 ms", "p99 ms", "max ms", "codes"), cheap_rows))
    print(f"\nmachine: {machine()}")
    return checks.exit_code()


if __name__ == "__main__":
    sys.exit(main())
