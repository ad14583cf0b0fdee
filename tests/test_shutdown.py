"""SIGTERM: health flips to NOT_SERVING, new work is refused (gRPC and fal's HTTP API), work in flight and in
the queue finishes."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from conftest import needs_export_tools
from grpc_harness import quick_request
from sam2serve.v1 import sam2serve_pb2 as pb
from sam2serve.v1 import sam2serve_pb2_grpc as pb_grpc

pytestmark = needs_export_tools
Health = health_pb2.HealthCheckResponse


def test_sigterm_drains_in_flight_and_queued_work(tiny_engine_dir):
    env = {**os.environ, "SAM2SERVE_ENGINES": str(tiny_engine_dir), "SAM2SERVE_PORT": "0",
           "SAM2SERVE_HOST": "127.0.0.1", "SAM2SERVE_DRAIN_SECONDS": "120", "SAM2SERVE_METRICS_PORT": "0",
           "SAM2SERVE_HTTP_PORT": "0"}
    proc = subprocess.Popen([sys.executable, "-m", "sam2serve.cli", "serve"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        port = http_port = None
        for line in proc.stdout:  # type: ignore[union-attr]
            if m := re.search(r"listening on 127\.0\.0\.1:(\d+), fal's HTTP API on :(\d+)", line):
                port, http_port = int(m.group(1)), int(m.group(2))
                break
        assert port and http_port, "server did not start"
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        stub = pb_grpc.AutoSegmentServiceStub(channel)
        health = health_pb2_grpc.HealthStub(channel)
        assert health.Check(health_pb2.HealthCheckRequest(), timeout=30).status == Health.SERVING

        streams = [stub.Subscribe(quick_request(points_per_side=8), timeout=300) for _ in range(2)]
        first = [next(s) for s in streams]  # both accepted: one running or queued, one queued
        assert all(e.WhichOneof("event") == "status" for e in first)
        results: list[pb.SubscribeEvent | Exception] = [None, None]  # type: ignore[list-item]

        def finish(i: int) -> None:
            try:
                results[i] = list(streams[i])[-1]
            except Exception as e:
                results[i] = e

        readers = [threading.Thread(target=finish, args=(i,)) for i in range(2)]
        for t in readers:
            t.start()
        watch = health.Watch(health_pb2.HealthCheckRequest(), timeout=120)
        assert next(watch).status == Health.SERVING
        proc.send_signal(signal.SIGTERM)
        assert next(watch).status == Health.NOT_SERVING
        with pytest.raises(grpc.RpcError) as refused:
            stub.Submit(quick_request(), timeout=30)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE and "shutting down" in refused.value.details()
        draining = httpx.post(f"http://127.0.0.1:{http_port}/queue/fal-ai/sam2/auto-segment", timeout=30,
                              json={"image_url": "data:image/png;base64,AAAA"})
        assert draining.status_code == 503 and "shutting down" in draining.json()["detail"]
        assert draining.headers["x-fal-retryable"] == "true"
        for t in readers:
            t.join(300)
        for event in results:
            assert isinstance(event, pb.SubscribeEvent), event
            assert event.WhichOneof("event") == "result" and event.result.total_masks >= 1
        assert proc.wait(timeout=120) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_an_expiring_drain_cancels_the_work_and_exits_0(tiny_engine_dir):
    """Before, a drain that ran out of time dropped the running job with the process and exited 1; now its
    caller sees CANCELLED and the exit is an orderly 0."""
    env = {**os.environ, "SAM2SERVE_ENGINES": str(tiny_engine_dir), "SAM2SERVE_PORT": "0",
           "SAM2SERVE_HOST": "127.0.0.1", "SAM2SERVE_DRAIN_SECONDS": "1", "SAM2SERVE_METRICS_PORT": "-1"}
    proc = subprocess.Popen([sys.executable, "-m", "sam2serve.cli", "serve"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        port = None
        for line in proc.stdout:  # type: ignore[union-attr]
            if m := re.search(r"listening on 127\.0\.0\.1:(\d+)", line):
                port = int(m.group(1))
                break
        assert port, "server did not start"
        stub = pb_grpc.AutoSegmentServiceStub(grpc.insecure_channel(f"127.0.0.1:{port}"))
        events = stub.Subscribe(quick_request(points_per_side=64), timeout=300)  # minutes of work
        for event in events:  # in the decoder batches, where a running job stops when cancelled
            if event.status.state == pb.RequestStatus.IN_PROGRESS and event.status.progress > 0:
                break
        proc.send_signal(signal.SIGTERM)
        with pytest.raises(grpc.RpcError) as ended:
            list(events)
        assert ended.value.code() == grpc.StatusCode.CANCELLED and "was cancelled" in ended.value.details()
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
