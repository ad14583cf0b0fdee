"""Drain suite (a script with figures, not a timed test): SIGTERM to a real `sam2serve serve` process (in-process
queue) with jobs completed, running and queued, and a drain budget that expires. What every client sees.

Before SIGTERM: job A completed (its result not yet fetched); job B running (in its decoder batches, minutes
of work); behind it C (Submit, watched), F (AutoSegment, waiting) and E (Subscribe). Then SIGTERM, and at once
GetResult(A), a new Submit and a health check. The drain (`--drain-seconds`) runs out while B runs: B and the
queued jobs are cancelled, their callers see CANCELLED (or UNAVAILABLE once the server is gone) with a message,
and the process exits 0.

The full run also does the drain that completes: two jobs running/queued at SIGTERM finish, and their results
are fetched after the last one ended (the results grace), then the process exits.

Checks: GetResult(A) OK after SIGTERM; new work UNAVAILABLE "shutting down"; health NOT_SERVING; every
waiting client CANCELLED/UNAVAILABLE with a message (streams may instead end on a CANCELLED status); never
INTERNAL/UNKNOWN; exit code 0 within the budget (+ 5 s for running jobs to stop + a margin).

    python tests/suite_drain.py --engines engines/sam2.1_hiera_tiny
    python tests/suite_drain.py --short --engines DIR          # the expiring drain only, 4 s budget
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from collections.abc import Callable

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from grpc_harness import quick_request
from sam2serve.v1 import sam2serve_pb2 as pb
from suite_common import Checks, ServerProcess, channel, code_name, machine, stub, table, wait_serving

State = pb.RequestStatus
ENDINGS = ("CANCELLED", "UNAVAILABLE")
CANCEL_WAIT_S = 5.0  # the server waits this long for running jobs to stop after the budget (jobs/service.py)


class Client(threading.Thread):
    """One caller blocked on the server: what it saw in the end (code, message, last state), and when."""

    def __init__(self, name: str, call: Callable[[], tuple[str, str, str]]) -> None:
        super().__init__(daemon=True)
        self.name_, self.call = name, call
        self.outcome: tuple[str, str, str] = ("none", "", "")
        self.ended_at = 0.0

    def run(self) -> None:
        try:
            self.outcome = self.call()
        except grpc.RpcError as e:
            self.outcome = (code_name(e), e.details() or "", "")  # type: ignore[attr-defined]
        self.ended_at = time.monotonic()


def watch(s, request_id: str) -> Callable[[], tuple[str, str, str]]:  # type: ignore[no-untyped-def]
    def call() -> tuple[str, str, str]:
        last = "none"
        try:
            for status in s.WatchStatus(pb.StatusRequest(request_id=request_id), timeout=600):
                last = State.State.Name(status.state)
        except grpc.RpcError as e:
            return code_name(e), e.details() or "", last
        return "OK", "", last
    return call


def expiring(engines: str, drain_s: float, checks: Checks) -> list[tuple[object, ...]]:
    server = ServerProcess(engines, "--workers", "1", "--queue-size", "8", "--drain-seconds", str(drain_s))
    rows: list[tuple[object, ...]] = []
    try:
        wait_serving(server.address)
        ch = channel(server.address)
        s = stub(ch)
        a = s.Submit(quick_request(points_per_side=1), timeout=60).request_id
        watch(s, a)()
        b = s.Submit(quick_request(points_per_side=64), timeout=60).request_id  # 4 096 prompts: minutes
        c = s.Submit(quick_request(points_per_side=1), timeout=60).request_id
        for status in s.WatchStatus(pb.StatusRequest(request_id=b), timeout=1800):
            if status.state == State.IN_PROGRESS and status.progress > 0:
                break  # in its decoder batches, where a running job stops when cancelled
        f_request = quick_request(points_per_side=1)
        clients = [Client("WatchStatus on B (running)", watch(s, b)), Client("WatchStatus on C (queued)", watch(s, c)),
                   Client("AutoSegment F (queued)", lambda: ("OK", "", str(s.AutoSegment(f_request, timeout=600)
                                                                             .total_masks) + " masks"))]
        subscribe = s.Subscribe(quick_request(points_per_side=1), timeout=600)
        first = next(subscribe)

        def rest_of_subscribe() -> tuple[str, str, str]:
            last = State.State.Name(first.status.state)
            for event in subscribe:
                if event.WhichOneof("event") == "result":
                    return "OK", "", "result"
                last = State.State.Name(event.status.state)
            return "OK", "", last

        clients.append(Client("Subscribe E (queued)", rest_of_subscribe))
        for client in clients:
            client.start()
        health = health_pb2_grpc.HealthStub(ch)
        sigterm = time.monotonic()
        server.process.send_signal(15)
        try:
            result_a = s.GetResult(pb.ResultRequest(request_id=a), timeout=30)
            got_a = ("OK", f"{result_a.total_masks} masks")
        except grpc.RpcError as e:
            got_a = (code_name(e), e.details() or "")  # type: ignore[attr-defined]
        checks.check(got_a[0] == "OK", f"GetResult of a job completed before SIGTERM: {got_a}")
        rows.append(("GetResult A (completed before SIGTERM)", *got_a, "", time.monotonic() - sigterm))
        try:
            s.Submit(quick_request(points_per_side=1), timeout=30)
            refused = ("OK", "")
        except grpc.RpcError as e:
            refused = (code_name(e), e.details() or "")  # type: ignore[attr-defined]
        checks.check(refused[0] == "UNAVAILABLE" and "shutting down" in refused[1], f"new Submit: {refused}")
        rows.append(("Submit after SIGTERM", *refused, "", time.monotonic() - sigterm))
        try:
            serving = health_pb2.HealthCheckResponse.ServingStatus.Name(
                health.Check(health_pb2.HealthCheckRequest(), timeout=10).status)
        except grpc.RpcError as e:
            serving = code_name(e)
        checks.check(serving == "NOT_SERVING", f"health after SIGTERM: {serving}")
        rows.append(("Health.Check after SIGTERM", serving, "", "", time.monotonic() - sigterm))
        for client in clients:
            client.join(300)
            code, message, last = client.outcome
            rows.append((client.name_, code, message[:100], last, client.ended_at - sigterm))
            checks.check(code not in ("INTERNAL", "UNKNOWN"), f"{client.name_}: {code} {message}")
            ended_ok = (code in ENDINGS and bool(message)) or (code == "OK" and last == "CANCELLED")
            checks.check(ended_ok, f"{client.name_}: {code} {message!r} last state {last}")
        try:
            s.GetResult(pb.ResultRequest(request_id=b), timeout=10)
            got_b = ("OK", "")
        except grpc.RpcError as e:
            got_b = (code_name(e), e.details() or "")  # type: ignore[attr-defined]
        rows.append(("GetResult B after its stream ended", *got_b, "", time.monotonic() - sigterm))
        checks.check(got_b[0] in ENDINGS, f"GetResult of the cancelled job: {got_b}")
        ch.close()
        rc = server.process.wait(drain_s + CANCEL_WAIT_S + 60)
        exited = time.monotonic() - sigterm
        rows.append(("process exit", f"exit code {rc}", "", "", exited))
        checks.check(rc == 0, f"exit code {rc}")
        checks.check(exited < drain_s + CANCEL_WAIT_S + 20, f"exit {exited:.1f} s after SIGTERM")
    finally:
        server.kill()
    return rows


def completing(engines: str, checks: Checks) -> list[tuple[object, ...]]:
    server = ServerProcess(engines, "--workers", "1", "--drain-seconds", "600", "--drain-results-seconds", "60")
    rows: list[tuple[object, ...]] = []
    try:
        wait_serving(server.address)
        with channel(server.address) as ch:
            s = stub(ch)
            ids = [s.Submit(quick_request(points_per_side=1), timeout=60).request_id for _ in range(2)]
            sigterm = time.monotonic()
            server.process.send_signal(15)
            for request_id in ids:
                code, message, last = watch(s, request_id)()
                rows.append((f"WatchStatus on {request_id[:8]}", code, message, last, time.monotonic() - sigterm))
                checks.check(last == "COMPLETED", f"job during a drain: {code} {message} {last}")
            for request_id in ids:
                try:
                    result = s.GetResult(pb.ResultRequest(request_id=request_id), timeout=30)
                    got = ("OK", f"{result.total_masks} masks")
                except grpc.RpcError as e:
                    got = (code_name(e), e.details() or "")  # type: ignore[attr-defined]
                rows.append((f"GetResult {request_id[:8]} after the last job ended", *got, "",
                             time.monotonic() - sigterm))
                checks.check(got[0] == "OK", f"GetResult after the drain's last job: {got}")
            fetched = time.monotonic()
        rc = server.process.wait(120)
        rows.append(("process exit", f"exit code {rc}", f"{time.monotonic() - fetched:.1f} s after the last fetch",
                     "", time.monotonic() - sigterm))
        checks.check(rc == 0, f"exit code {rc}")
    finally:
        server.kill()
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--engines", default="engines/sam2.1_hiera_tiny")
    parser.add_argument("--short", action="store_true", help="the expiring drain only, 4 s budget")
    parser.add_argument("--drain-seconds", type=float, default=0, help="the budget (default 8; short 4)")
    args = parser.parse_args(argv)
    drain_s = args.drain_seconds or (4.0 if args.short else 8.0)
    checks = Checks()
    rows = expiring(args.engines, drain_s, checks)
    headers = ("client", "code / outcome", "message", "last state", "s after SIGTERM")
    print(f"\n### SIGTERM with the drain expiring (--drain-seconds {drain_s:g}, in-process queue)\n")
    print(table(headers, rows))
    if not args.short:
        print("\n### SIGTERM with a drain that completes (results fetched after the last job ended)\n")
        print(table(headers, completing(args.engines, checks)))
    print(f"\nmachine: {machine()}")
    return checks.exit_code()


if __name__ == "__main__":
    sys.exit(main())
