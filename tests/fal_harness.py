"""fal's HTTP API under test: a deployment for one queue mode (one in-process server, or two replicas sharing
a Redis queue), a webhook receiver, inputs, and the gRPC answer to compare with."""

from __future__ import annotations

import base64
import json
import ssl
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import cv2
import httpx
import numpy as np

from conftest import TlsFiles
from grpc_harness import ServerThread, decode_png, png_bytes
from sam2serve.config import ServerConfig
from sam2serve.v1 import sam2serve_pb2 as pb

APP = "fal-ai/sam2/auto-segment"
KEY = "fal-test-key"
# 16 prompts and zero thresholds: a few seconds on 2 cores, and untrained engines still yield masks
QUICK = {"points_per_side": 4, "pred_iou_thresh": 0.0, "stability_score_thresh": 0.0}
# 1024 prompts (tens of seconds): long enough to be caught in progress, or to hold the only worker
SLOW = {**QUICK, "points_per_side": 32}
PNG = png_bytes()


def data_uri(data: bytes = PNG, content_type: str = "image/png") -> str:
    return f"data:{content_type};base64,{base64.b64encode(data).decode()}"


@dataclass
class FalDeployment:
    """`front` takes submissions and runs the jobs (one worker, a queue of one); the URLs handed out point at
    `back`. With Redis they are two replicas (`back` runs nothing, --public-url on `front` names it), so every
    call after a submission crosses replicas; in-process they are the same server."""

    mode: str
    front: ServerThread
    back: ServerThread
    tls: TlsFiles

    def http(self, server: ServerThread | None = None, key: str | None = KEY) -> httpx.Client:
        headers = {"Authorization": f"Key {key}"} if key else {}
        return httpx.Client(base_url=(server or self.front).http_base, headers=headers, timeout=300,
                            verify=ssl.create_default_context(cafile=self.tls.ca))

    def grpc_answer(self, **fields: object) -> pb.AutoSegmentResponse:
        """The gRPC API's answer to a fal input of QUICK-like fields (the image is PNG)."""
        return self.front.stub.AutoSegment(pb.AutoSegmentRequest(image_bytes=PNG, **fields), timeout=600,
                                           metadata=(("authorization", f"Key {KEY}"),))

    def stop(self) -> None:
        for server in {id(self.front): self.front, id(self.back): self.back}.values():
            server.stop()


def deploy(mode: str, engine: object, tls: TlsFiles, redis_url: str = "", **config: object) -> FalDeployment:
    base = ServerConfig(workers=1, queue_size=1, api_key=KEY, allow_private_urls=True, http_port=0,
                        tls_cert=str(tls.cert), tls_key=str(tls.key), **config)  # type: ignore[arg-type]
    if mode == "memory":
        server = ServerThread(base, engine, tls.ca)
        return FalDeployment(mode, server, server, tls)
    shared = replace(base, redis_url=redis_url, redis_prefix=f"fal-{uuid.uuid4().hex[:8]}:")
    back = ServerThread(replace(shared, workers=0), engine, tls.ca)
    front = ServerThread(replace(shared, public_url=back.http_base), engine, tls.ca)
    return FalDeployment(mode, front, back, tls)


def decode_data_uri(uri: str) -> np.ndarray:
    header, _, payload = uri.partition(",")
    assert header == "data:image/png;base64", header
    return decode_png(base64.b64decode(payload))


def assert_same_masks(output: dict, answer: pb.AutoSegmentResponse) -> None:
    """fal's output (sync_mode data URIs) holds exactly the gRPC answer's pictures."""
    assert len(output["individual_masks"]) == len(answer.individual_masks) >= 1
    pairs = [(output["combined_mask"], answer.combined_mask),
             *zip(output["individual_masks"], answer.individual_masks, strict=True)]
    for fal_file, image in pairs:
        assert fal_file["file_name"] == image.file_name and fal_file["content_type"] == image.content_type
        assert (fal_file["width"], fal_file["height"], fal_file["file_size"]) == (image.width, image.height,
                                                                                  image.file_size)
        np.testing.assert_array_equal(decode_data_uri(fal_file["url"]), decode_png(image.data))


def assert_file_object(file: dict, width: int = 320, height: int = 240) -> None:
    assert set(file) == {"url", "content_type", "file_name", "file_size", "width", "height"}
    assert (file["width"], file["height"], file["content_type"]) == (width, height, "image/png")


def decoded(response: httpx.Response) -> np.ndarray:
    return cv2.imdecode(np.frombuffer(response.content, np.uint8), cv2.IMREAD_UNCHANGED)


class WebhookReceiver:
    """Collects the JSON bodies POSTed to it (fal_webhook), by request id."""

    def __init__(self) -> None:
        self._bodies: dict[str, dict] = {}
        self._arrived = threading.Condition()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()
                with receiver._arrived:
                    receiver._bodies[body["request_id"]] = body
                    receiver._arrived.notify_all()

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/hook"

    def body_for(self, request_id: str, timeout: float = 300) -> dict:
        with self._arrived:
            assert self._arrived.wait_for(lambda: request_id in self._bodies, timeout), f"no webhook for {request_id}"
            return self._bodies[request_id]

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def sse_events(client: httpx.Client, path: str) -> Iterator[dict]:
    """The `data:` events of a server-sent event stream, parsed."""
    with client.stream("GET", path, headers={"Accept": "text/event-stream"}) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        data: list[str] = []
        for line in response.iter_lines():
            if line.startswith("data:"):
                data.append(line[5:].lstrip())
            elif not line and data:
                yield json.loads("\n".join(data))
                data = []
