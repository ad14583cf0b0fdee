"""Status-stream suite (a script with figures, not a timed test): as many WatchStatus streams as the server's
`--max-status-streams` allows (1 000 by default) open on one queued job of the in-process queue, while unary
calls run.

A long job holds the worker and a small one waits behind it; every stream watches the small one. Figures:
unary p50/p99 (GetStatus, GetInfo) without and with the streams open, the time to open them, the server's RSS
per stream, how many streams beyond the bound were refused (RESOURCE_EXHAUSTED, with a message), and the time
from Cancel of the watched job until every stream had seen CANCELLED and ended.

Checks: every stream opened and saw the terminal CANCELLED; every excess stream refused with
RESOURCE_EXHAUSTED naming the bound; no INTERNAL/UNKNOWN; unary p50 with the streams below `--max-p50-ms`.

    python tests/suite_streams.py --engines engines/sam2.1_hiera_tiny --streams 1000   # starts its own server
    python tests/suite_streams.py --short --server 127.0.0.1:50051 --server-pid 1234   # its bound, from GetInfo
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable

import grpc

from grpc_harness import quick_request
from sam2serve.v1 import sam2serve_pb2 as pb
from sam2serve.v1 import sam2serve_pb2_grpc as pb_grpc
from suite_common import (
    CHANNEL_OPTIONS,
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
STREAMS_PER_CHANNEL = 100


class Streams:
    """WatchStatus streams from a grpc.aio client on its own event loop thread."""

    def __init__(self, address: str, request_id: str) -> None:
        self.address, self.request_id = address, request_id
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.channels: list[grpc.aio.Channel] = []
        self.tasks: list[asyncio.Task[tuple[str, str, str]]] = []

    def run(self, coro, timeout: float = 600):  # type: ignore[no-untyped-def]
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    async def _watch(self, ch: grpc.aio.Channel, opened: asyncio.Event | None,
                     counter: list[int], n: int) -> tuple[str, str, str]:
        """(code, last state, message) of one stream."""
        last = "none"
        first = True
        try:
            async for status in pb_grpc.AutoSegmentServiceStub(ch).WatchStatus(
                    pb.StatusRequest(request_id=self.request_id), timeout=1800):
                last = State.State.Name(status.state)
                if first:
                    first = False
                    counter[0] += 1
                    if opened is not None and counter[0] >= n:
                        opened.set()
            return "OK", last, ""
        except grpc.aio.AioRpcError as e:
            return e.code().name, last, e.details() or ""
        finally:
            if first:
                counter[0] += 1  # ended without a message: counts as settled for the opener
                if opened is not None and counter[0] >= n:
                    opened.set()

    async def _open(self, n: int) -> list[asyncio.Task[tuple[str, str, str]]]:
        opened, counter = asyncio.Event(), [0]
        tasks = []
        for i in range(n):
            if i % STREAMS_PER_CHANNEL == 0:
                self.channels.append(grpc.aio.insecure_channel(self.address, options=CHANNEL_OPTIONS))
            tasks.append(asyncio.create_task(self._watch(self.channels[-1], opened, counter, n)))
        await opened.wait()
        return tasks

    def open(self, n: int) -> list[asyncio.Task[tuple[str, str, str]]]:
        return self.run(self._open(n))

    def results(self, tasks: list[asyncio.Task[tuple[str, str, str]]], timeout: float) -> list[tuple[str, str, str]]:
        """Each stream's end; one still open after `timeout` is cancelled and reported as ("STILL OPEN", ...)."""
        async def gather() -> list[tuple[str, str, str]]:
            _, pending = await asyncio.wait(tasks, timeout=timeout)
            for task in pending:
                task.cancel()
            return [t.result() if t in set(tasks) - pending else ("STILL OPEN", "", "") for t in tasks]
        return self.run(gather(), timeout + 30)

    def close(self) -> None:
        async def close_all() -> None:
            for ch in self.channels:
                await ch.close()
        self.run(close_all())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def unary_latencies(address: str, calls: int, request_id: str) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {"GetStatus": [], "GetInfo": []}
    with channel(address) as ch:
        s = stub(ch)
        rpcs: dict[str, Callable[[], object]] = {
            "GetStatus": lambda: s.GetStatus(pb.StatusRequest(request_id=request_id), timeout=30),
            "GetInfo": lambda: s.GetInfo(pb.GetInfoRequest(), timeout=30)}
        for name, call in rpcs.items():
            call()
            for _ in range(calls):
                t0 = time.perf_counter()
                call()
                out[name].append(time.perf_counter() - t0)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_server_arguments(parser)
    parser.add_argument("--streams", type=int, default=1000, help="the bound of the server it starts")
    parser.add_argument("--excess", type=int, default=0, help="streams opened beyond the bound (default 50; short 10)")
    parser.add_argument("--calls", type=int, default=0, help="unary calls per phase (default 300; short 60)")
    parser.add_argument("--max-p50-ms", type=float, default=500.0, help="bound on unary p50 with the streams")
    args = parser.parse_args(argv)
    excess = args.excess or (10 if args.short else 50)
    calls = args.calls or (60 if args.short else 300)
    checks = Checks()
    server = None
    address, pid = args.server, args.server_pid
    if not address:
        server = ServerProcess(args.engines, "--workers", "1", "--max-status-streams", str(args.streams))
        address, pid = server.address, server.pid
    rows: list[tuple[object, ...]] = []
    blocker = watched = ""
    try:
        wait_serving(address)
        with channel(address) as ch:
            s = stub(ch)
            bound = s.GetInfo(pb.GetInfoRequest(), timeout=30).limits.max_status_streams
            blocker = s.Submit(quick_request(points_per_side=64), timeout=60).request_id  # minutes of work
            watched = s.Submit(quick_request(points_per_side=1), timeout=60).request_id
            for status in s.WatchStatus(pb.StatusRequest(request_id=blocker), timeout=1800):
                if status.state == State.IN_PROGRESS and status.progress > 0:
                    break  # past its encoder: the RSS figures see the streams, not the encoder's working set
        quiet = unary_latencies(address, calls, watched)
        rss_before = rss_mib(pid) if pid else float("nan")
        streams = Streams(address, watched)
        t0 = time.perf_counter()
        tasks = streams.open(bound)
        open_s = time.perf_counter() - t0
        rss_open = rss_mib(pid) if pid else float("nan")
        early = [t.result() for t in tasks if t.done()]
        checks.check(not early, f"{len(early)} streams ended before the job did: {Counter(early).most_common(3)}")
        busy = unary_latencies(address, calls, watched)
        refused = streams.results(streams.open(excess), 60)
        refused_codes = Counter(code for code, _, _ in refused)
        checks.check(refused_codes == Counter({"RESOURCE_EXHAUSTED": excess}),
                     f"excess streams: {codes_text(refused_codes)}")
        checks.check(all(str(bound) in m and "status streams" in m for _, _, m in refused),
                     f"excess refusal messages: {refused[:1]}")
        with channel(address) as ch:
            t0 = time.perf_counter()
            stub(ch).Cancel(pb.CancelRequest(request_id=watched), timeout=30)
            ended = streams.results(tasks, 120)
            cancel_s = time.perf_counter() - t0
            stub(ch).Cancel(pb.CancelRequest(request_id=blocker), timeout=30)
            after = stub(ch).GetInfo(pb.GetInfoRequest(), timeout=30)  # still answering
            checks.check(bool(after.model.name), "GetInfo after the streams")
        streams.close()
        ended_codes = Counter(f"{code} {state}" for code, state, _ in ended)
        checks.check(ended_codes == Counter({"OK CANCELLED": bound}), f"streams' ends: {codes_text(ended_codes)}")
        checks.check(not any(c.startswith(("INTERNAL", "UNKNOWN")) for c in ended_codes | refused_codes),
                     "INTERNAL/UNKNOWN on a stream")
        for name in ("GetStatus", "GetInfo"):
            q50, q99, _ = quantiles_ms(quiet[name])
            b50, b99, _ = quantiles_ms(busy[name])
            rows.append((name, calls, q50, q99, b50, b99, b50 / q50))
            checks.check(b50 < args.max_p50_ms, f"{name} p50 with {bound} streams: {b50:.1f} ms")
    except grpc.RpcError as e:
        checks.check(False, f"unexpected {code_name(e)}: {e.details()}")  # type: ignore[attr-defined]
    finally:
        with channel(address) as ch:  # the jobs are cancelled whatever happened (a running server is left clean)
            for request_id in (watched, blocker):
                if request_id:
                    with contextlib.suppress(grpc.RpcError):
                        stub(ch).Cancel(pb.CancelRequest(request_id=request_id), timeout=30)
        if server is not None:
            rc = server.terminate()
            checks.check(rc == 0, f"server exit code {rc}")
            server.kill()
    if rows:
        print(f"\n### {bound} WatchStatus streams on one queued job (in-process queue)\n")
        print(table(("unary call", "calls", "p50 ms, no streams", "p99 ms, no streams", f"p50 ms, {bound} streams",
                     f"p99 ms, {bound} streams", "p50 ratio"), rows))
        print()
        print(table(("figure", "value"), [
            ("streams opened (the server's --max-status-streams)", bound),
            ("time to open them, s", open_s),
            ("server RSS before / with the streams, MiB", f"{rss_before:.0f} / {rss_open:.0f}"),
            ("server RSS per stream, KiB", (rss_open - rss_before) * 1024 / bound),
            (f"excess streams refused ({excess} tried)", codes_text(refused_codes)),
            ("Cancel → every stream saw CANCELLED and ended, s", cancel_s),
            ("streams' ends", codes_text(ended_codes)),
        ]))
    print(f"\nmachine: {machine()}")
    return checks.exit_code()


if __name__ == "__main__":
    sys.exit(main())
