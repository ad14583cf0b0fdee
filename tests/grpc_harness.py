"""An in-process sam2serve gRPC server on 127.0.0.1 (its own event loop thread) and helpers for tests."""

from __future__ import annotations

import asyncio
import threading
from dataclasses import replace
from pathlib import Path

import cv2
import grpc
import numpy as np

from sam2serve.app import RunningServer, start_server
from sam2serve.config import ServerConfig
from sam2serve.images import synthetic_scene
from sam2serve.v1 import sam2serve_pb2 as pb
from sam2serve.v1 import sam2serve_pb2_grpc as pb_grpc


class ServerThread:
    def __init__(self, config: ServerConfig, engine: object, ca: Path | None = None) -> None:
        """`ca`: the authority of config.tls_cert, for the test's own channel when the server speaks TLS."""
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        metrics_port = 0 if config.metrics_port >= 0 else -1  # a free port each, never the default 9090
        http_port = 0 if config.http_port >= 0 else -1
        self.running: RunningServer = self.run(start_server(
            replace(config, host="127.0.0.1", port=0, metrics_port=metrics_port, http_port=http_port), engine))
        self.address = f"127.0.0.1:{self.running.port}"
        options = [("grpc.max_receive_message_length", 256 << 20), ("grpc.max_send_message_length", 256 << 20)]
        self.channel = (grpc.secure_channel(self.address, grpc.ssl_channel_credentials(ca.read_bytes()), options)
                        if ca is not None else grpc.insecure_channel(self.address, options=options))
        self.stub = pb_grpc.AutoSegmentServiceStub(self.channel)

    @property
    def http_base(self) -> str:
        """The base URL of fal's HTTP API (config.http_port)."""
        scheme = "https" if self.running.config.tls_cert else "http"
        return f"{scheme}://127.0.0.1:{self.running.http_port}"

    def run(self, coro, timeout: float = 120.0):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        self.channel.close()
        self.run(self.running.shutdown())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def png_bytes(h: int = 240, w: int = 320, seed: int = 0) -> bytes:
    ok, data = cv2.imencode(".png", cv2.cvtColor(synthetic_scene(h, w, seed), cv2.COLOR_RGB2BGR))
    assert ok
    return data.tobytes()


def quick_request(**fields: object) -> pb.AutoSegmentRequest:
    """4×4 prompts and zero thresholds: ~3 s on 2 cores, and untrained engines still yield a mask."""
    base = {"image_bytes": png_bytes(), "points_per_side": 4, "pred_iou_thresh": 0.0, "stability_score_thresh": 0.0}
    return pb.AutoSegmentRequest(**{**base, **fields})


def slow_request() -> pb.AutoSegmentRequest:
    """1024 prompts (tens of seconds): long enough to be cancelled or caught in progress."""
    return quick_request(points_per_side=32)


def decode_png(data: bytes) -> np.ndarray:
    return cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)


def wait_for_state(stub: pb_grpc.AutoSegmentServiceStub, request_id: str, state: int) -> pb.RequestStatus:
    for status in stub.WatchStatus(pb.StatusRequest(request_id=request_id), timeout=120):
        if status.state == state:
            return status
    raise AssertionError(f"{request_id} never reached {pb.RequestStatus.State.Name(state)}")
