"""The gRPC service with real (untrained tiny) engines on 127.0.0.1: every RPC, streaming order, cancel,
backpressure, deadlines, auth, message limits and the bad-input corpus."""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
from pathlib import Path

import cv2
import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from conftest import needs_export_tools, require
from grpc_harness import ServerThread, decode_png, png_bytes, quick_request, slow_request, wait_for_state
from sam2serve.config import ServerConfig
from sam2serve.images import synthetic_scene
from sam2serve.v1 import sam2serve_pb2 as pb

pytestmark = needs_export_tools
State = pb.RequestStatus


@pytest.fixture(scope="module")
def server(tiny_engine):
    s = ServerThread(ServerConfig(workers=1, queue_size=2), tiny_engine)
    yield s
    s.stop()


def _assert_serving(server: ServerThread) -> None:
    health = health_pb2_grpc.HealthStub(server.channel)
    assert health.Check(health_pb2.HealthCheckRequest(), timeout=10).status == health_pb2.HealthCheckResponse.SERVING
    assert server.stub.GetInfo(pb.GetInfoRequest(), timeout=10).model.name


def test_get_info_flags_untrained_weights(server):
    info = server.stub.GetInfo(pb.GetInfoRequest(), timeout=10)
    assert info.model.name == "sam2.1_hiera_tiny" and info.model.untrained and info.model.weights_origin == "untrained"
    assert "UNTRAINED" in info.warning and info.model.backend == "onnxruntime" and info.model.providers
    assert info.model.encoder_precision == "fp32"  # the int8 encoder only when asked (test_variants)
    d = info.defaults
    assert (d.points_per_side, round(d.pred_iou_thresh, 2), round(d.stability_score_thresh, 2),
            d.min_mask_region_area) == (32, 0.88, 0.95, 100)
    assert info.limits.queue_size == 2 and info.limits.max_points_per_side == 64
    assert info.limits.max_decoder_prompts == 20480 and info.limits.job_time_limit_seconds == 1800


def test_auto_segment_returns_pictures_and_metadata(server):
    response = server.stub.AutoSegment(quick_request(return_rle=True, return_overlay=True), timeout=120)
    assert response.total_masks >= 1 and len(response.masks) == len(response.individual_masks) == response.total_masks
    combined = decode_png(response.combined_mask.data)
    assert combined.shape == (240, 320, 3) and response.combined_mask.content_type == "image/png"
    assert response.combined_mask.file_size == len(response.combined_mask.data)
    mask = decode_png(response.individual_masks[0].data)
    meta = response.masks[0]
    assert mask.shape == (240, 320) and int((mask > 0).sum()) == meta.area
    assert len(meta.bbox) == 4 and len(meta.crop_box) == 4 and meta.rle.counts and list(meta.rle.size) == [240, 320]
    assert 0 <= meta.predicted_iou <= 1 and len(meta.point_coords) == 1
    assert response.overlay.width == 320 and response.model.untrained
    t = response.timings
    assert t.encoder_seconds > 0 and t.decoder_seconds > 0 and t.total_seconds >= t.encoder_seconds


def test_jpeg_output_and_max_masks(server):
    response = server.stub.AutoSegment(quick_request(output_format=pb.OUTPUT_FORMAT_JPEG, max_masks=0,
                                                     return_individual_masks=False), timeout=120)
    assert response.combined_mask.content_type == "image/jpeg" and response.combined_mask.data[:2] == b"\xff\xd8"
    assert len(response.masks) == 0 and len(response.individual_masks) == 0 and response.total_masks >= 1


def test_data_uri_input(server):
    uri = "data:image/png;base64," + base64.b64encode(png_bytes()).decode()
    request = quick_request()
    request.image_data_uri = uri
    assert server.stub.AutoSegment(request, timeout=120).total_masks >= 1


def test_submit_watch_result_in_order(server):
    submitted = server.stub.Submit(quick_request(), timeout=10)
    states = [s.state for s in server.stub.WatchStatus(pb.StatusRequest(request_id=submitted.request_id, logs=True),
                                                        timeout=120)]
    assert states[0] in (State.IN_QUEUE, State.IN_PROGRESS) and states[-1] == State.COMPLETED
    assert states == sorted(states) and State.IN_PROGRESS in states
    status = server.stub.GetStatus(pb.StatusRequest(request_id=submitted.request_id, logs=True), timeout=10)
    assert status.state == State.COMPLETED and status.progress == 1.0 and status.logs
    assert status.finished_at.seconds >= status.started_at.seconds >= status.submitted_at.seconds > 0
    assert server.stub.GetResult(pb.ResultRequest(request_id=submitted.request_id), timeout=10).total_masks >= 1


def test_subscribe_streams_status_then_result(server):
    events = list(server.stub.Subscribe(quick_request(), timeout=120))
    kinds = [e.WhichOneof("event") for e in events]
    assert kinds[-1] == "result" and set(kinds[:-1]) == {"status"}
    assert events[-2].status.state == State.COMPLETED and events[-1].result.total_masks >= 1


def test_cancel_in_queue_and_in_progress_and_queue_full(server):
    stub = server.stub
    running = stub.Submit(slow_request(), timeout=10).request_id
    wait_for_state(stub, running, State.IN_PROGRESS)
    queued = [stub.Submit(slow_request(), timeout=10) for _ in range(2)]
    assert [q.queue_position for q in queued] == [0, 1]
    with pytest.raises(grpc.RpcError) as full:
        stub.Submit(quick_request(), timeout=10)
    assert full.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "queue is full" in full.value.details()
    with pytest.raises(grpc.RpcError) as early:
        stub.GetResult(pb.ResultRequest(request_id=queued[0].request_id), timeout=10)
    assert early.value.code() == grpc.StatusCode.FAILED_PRECONDITION

    for q in queued:
        cancelled = stub.Cancel(pb.CancelRequest(request_id=q.request_id), timeout=10)
        assert cancelled.outcome == pb.CancelResponse.CANCELLED_IN_QUEUE and cancelled.status.state == State.CANCELLED
    again = stub.Cancel(pb.CancelRequest(request_id=queued[0].request_id), timeout=10)
    assert again.outcome == pb.CancelResponse.ALREADY_CANCELLED
    stopping = stub.Cancel(pb.CancelRequest(request_id=running), timeout=10)
    assert stopping.outcome == pb.CancelResponse.CANCELLING_IN_PROGRESS
    final = wait_for_state(stub, running, State.CANCELLED)
    assert final.progress < 1.0  # stopped at a batch boundary, not run to the end
    with pytest.raises(grpc.RpcError) as gone:
        stub.GetResult(pb.ResultRequest(request_id=running), timeout=10)
    assert gone.value.code() == grpc.StatusCode.CANCELLED
    _assert_serving(server)


def test_images_over_the_cap_are_refused_at_submit_or_not_received(server):
    """16 × 60 MiB image_bytes used to be accepted and held by the queue until each job failed; now an image
    over the cap (20 MiB) is INVALID_ARGUMENT at Submit, and a message larger than the cap allows in any form
    is not received (RESOURCE_EXHAUSTED from gRPC)."""
    with pytest.raises(grpc.RpcError) as over:
        server.stub.Submit(quick_request(image_bytes=b"\x89PNG" * (21 << 18)), timeout=30)
    assert over.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "image_bytes is 21 MiB, over the limit of 20 MiB" in over.value.details()
    with pytest.raises(grpc.RpcError) as huge:
        server.stub.Submit(quick_request(image_bytes=b"\x89PNG" * (30 << 18)), timeout=30)
    assert huge.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, huge.value.details()
    _assert_serving(server)


def test_deadline_cancels_the_work(server):
    with pytest.raises(grpc.RpcError) as late:
        server.stub.AutoSegment(slow_request(), timeout=4)
    assert late.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    jobs = server.run(_all_terminal(server))
    assert jobs and all(state == "CANCELLED" for state in jobs[-1:])
    _assert_serving(server)


async def _all_terminal(server: ServerThread) -> list[str]:
    store = server.running.app.jobs.store
    while True:
        changed = store._changed  # taken before looking, so that no change is missed
        states = [job.state for job in store._jobs.values()]
        if all(state.terminal for state in states):
            return [state.name for state in states]
        await changed.wait()


def test_finished_job_cannot_be_cancelled_and_unknown_ids(server):
    done = server.stub.Submit(quick_request(), timeout=10).request_id
    wait_for_state(server.stub, done, State.COMPLETED)
    outcome = server.stub.Cancel(pb.CancelRequest(request_id=done), timeout=10).outcome
    assert outcome == pb.CancelResponse.ALREADY_FINISHED
    for call, message in ((server.stub.GetStatus, pb.StatusRequest(request_id="nope")),
                          (server.stub.GetResult, pb.ResultRequest(request_id="nope")),
                          (server.stub.Cancel, pb.CancelRequest(request_id="nope"))):
        with pytest.raises(grpc.RpcError) as info:
            call(message, timeout=10)
        assert info.value.code() == grpc.StatusCode.NOT_FOUND and "nope" in info.value.details()
    with pytest.raises(grpc.RpcError) as watch:
        list(server.stub.WatchStatus(pb.StatusRequest(request_id="nope"), timeout=10))
    assert watch.value.code() == grpc.StatusCode.NOT_FOUND
    huge = "x" * 100_000  # echoed in full, its status trailer passed the client's 16 KB limit: RESOURCE_EXHAUSTED
    for call, message in ((server.stub.GetStatus, pb.StatusRequest(request_id=huge)),
                          (server.stub.GetResult, pb.ResultRequest(request_id=huge)),
                          (server.stub.Cancel, pb.CancelRequest(request_id=huge)),
                          (lambda m, timeout: list(server.stub.WatchStatus(m, timeout=timeout)),
                           pb.StatusRequest(request_id=huge))):
        with pytest.raises(grpc.RpcError) as info:
            call(message, timeout=10)
        assert info.value.code() == grpc.StatusCode.NOT_FOUND and len(info.value.details()) < 200


BAD_INPUTS = [
    (pb.AutoSegmentRequest(), "no image in the request"),
    (quick_request(points_per_side=0), "points_per_side must be between 1 and 64"),
    (quick_request(points_per_side=1000), "points_per_side must be between 1 and 64"),
    (quick_request(pred_iou_thresh=float("nan")), "pred_iou_thresh must be a finite number"),
    (quick_request(stability_score_thresh=1.5), "stability_score_thresh must be between 0"),
    (quick_request(crop_n_layers=9), "crop_n_layers must be between 0 and 3"),
    (quick_request(points_per_side=1, crop_n_layers=1, crop_n_points_downscale_factor=2),
     "crop layer 1 would have no points"),
    (quick_request(points_per_side=3, crop_n_layers=2, crop_n_points_downscale_factor=2),
     "crop layer 2 would have no points"),
    (quick_request(points_per_side=64, crop_n_layers=3, use_m2m=True), "asks for 1,392,640 decoder prompts"),
    (quick_request(min_mask_region_area=-1), "min_mask_region_area must be between"),
    (quick_request(max_masks=-2), "max_masks must be 0 or more"),
    (quick_request(image_bytes=b"definitely not an image"), "image_bytes is not a supported image"),
    (quick_request(image_bytes=png_bytes()[:200]), "image_bytes"),
    (quick_request(image_data_uri="data:image/png;base64,@@@notbase64"), "not valid base64"),
    (quick_request(image_data_uri="http://example.com/x.png"), "image_data_uri"),
    (quick_request(image_url="ftp://example.com/x.png"), "ftp"),
    (quick_request(image_url="http://127.0.0.1:1/x.png"), "127.0.0.1"),
    (quick_request(image_url="http://169.254.169.254/latest/meta-data"), "169.254.169.254"),
    (quick_request(webhook_url="file:///etc/passwd"), "webhook_url must be an http or https URL"),
]


@pytest.mark.parametrize(("request_msg", "fragment"), BAD_INPUTS, ids=[f[1][:40] for f in BAD_INPUTS])
def test_bad_inputs_are_invalid_argument_and_the_server_stays_up(server, request_msg, fragment):
    with pytest.raises(grpc.RpcError) as info:
        server.stub.AutoSegment(request_msg, timeout=60)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
    assert fragment in info.value.details()
    # Through the queue: refused at Submit (parameters), or the job fails with the same status (image content).
    try:
        request_id = server.stub.Submit(request_msg, timeout=60).request_id
    except grpc.RpcError as e:
        assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and fragment in e.details()
    else:
        status = wait_for_state(server.stub, request_id, State.FAILED)
        assert status.error_code == grpc.StatusCode.INVALID_ARGUMENT.value[0] and fragment in status.error
        with pytest.raises(grpc.RpcError) as result:
            server.stub.GetResult(pb.ResultRequest(request_id=request_id), timeout=10)
        assert result.value.code() == grpc.StatusCode.INVALID_ARGUMENT and fragment in result.value.details()
    _assert_serving(server)


REFUSED_WEBHOOKS = [
    ("http://127.0.0.1:9/done", "webhook_url points at 127.0.0.1, a loopback address"),
    ("http://localhost:9/done", "webhook_url: host 'localhost' resolves to a loopback address"),
    ("http://10.1.2.3/done", "webhook_url points at 10.1.2.3, a private address"),
    ("http://[fe80::1]/done", "webhook_url points at fe80::1, a link-local address"),
    ("http://169.254.169.254/latest", "webhook_url points at 169.254.169.254, a cloud metadata address"),
    ("http://metadata.google.internal/x", "'metadata.google.internal' is a cloud metadata endpoint"),
    ("file:///etc/passwd", "webhook_url must be an http or https URL"),
]


@pytest.mark.parametrize(("url", "fragment"), REFUSED_WEBHOOKS, ids=[u for u, _ in REFUSED_WEBHOOKS])
def test_webhook_urls_the_address_rules_refuse_are_invalid_argument_at_submit(server, url, fragment):
    """image_url's rules, applied when the request comes: before, Submit took them and the job's end only logged
    the refusal."""
    with pytest.raises(grpc.RpcError) as info:
        server.stub.Submit(quick_request(webhook_url=url), timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
    assert fragment in info.value.details()
    _assert_serving(server)


@pytest.mark.parametrize(("method", "streaming", "message_type"), [
    ("GetInfo", False, "sam2serve.v1.GetInfoRequest"), ("Submit", False, "sam2serve.v1.AutoSegmentRequest"),
    ("WatchStatus", True, "sam2serve.v1.StatusRequest"), ("Subscribe", True, "sam2serve.v1.AutoSegmentRequest")])
def test_undecodable_requests_are_invalid_argument_naming_the_message(server, method, streaming, message_type):
    """Bytes that are not the method's protobuf message: gRPC's default was UNKNOWN naming a Python class."""
    path = f"/sam2serve.v1.AutoSegmentService/{method}"
    call = (server.channel.unary_stream if streaming else server.channel.unary_unary)(path)
    for garbage in (b"\xff\xff\xff\xff\x0f", b"\x0a\xff\xff\xff\xff\x7f"):  # bad varint; length past the end
        with pytest.raises(grpc.RpcError) as info:
            reply = call(garbage, timeout=10)
            if streaming:
                list(reply)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
        assert info.value.details() == f"the request is not a valid {message_type} message (protobuf wire format)"
    _assert_serving(server)


@pytest.fixture(scope="module")
def locked_server(tiny_engine):
    s = ServerThread(ServerConfig(api_key="s3cret-key", max_message_bytes=64 * 1024), tiny_engine)
    yield s
    s.stop()


def test_api_key_is_required_but_health_stays_open(locked_server):
    stub = locked_server.stub
    for metadata in ((), (("authorization", "Key wrong"),), (("authorization", "s3cret-key"),)):
        with pytest.raises(grpc.RpcError) as info:
            stub.GetInfo(pb.GetInfoRequest(), timeout=10, metadata=metadata)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED and "API key" in info.value.details()
    with pytest.raises(grpc.RpcError) as stream:
        list(stub.WatchStatus(pb.StatusRequest(request_id="x"), timeout=10))
    assert stream.value.code() == grpc.StatusCode.UNAUTHENTICATED
    for scheme in ("Key", "Bearer"):
        assert stub.GetInfo(pb.GetInfoRequest(), timeout=10, metadata=(("authorization", f"{scheme} s3cret-key"),))
    health = health_pb2_grpc.HealthStub(locked_server.channel)
    assert health.Check(health_pb2.HealthCheckRequest(), timeout=10).status == health_pb2.HealthCheckResponse.SERVING


def test_result_over_the_message_limit_is_a_clear_error(locked_server):
    key = (("authorization", "Key s3cret-key"),)
    ok, jpeg = cv2.imencode(".jpg", synthetic_scene(480, 640))
    assert ok and len(jpeg) < 48 * 1024
    request = quick_request(image_bytes=jpeg.tobytes(), return_overlay=True)  # its overlay PNG alone is larger
    with pytest.raises(grpc.RpcError) as info:
        locked_server.stub.AutoSegment(request, timeout=120, metadata=key)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "message limit" in info.value.details() and "max_masks" in info.value.details()


def test_reflection_with_buf_curl(server, tmp_path: Path):
    buf = shutil.which("buf") or str(Path(__import__("sys").executable).parent / "buf")
    require(Path(buf).exists(), "buf (PyPI buf-bin, the dev extra) is not installed")
    url = f"http://{server.address}/sam2serve.v1.AutoSegmentService/GetInfo"
    result = subprocess.run([buf, "curl", "--protocol", "grpc", "--http2-prior-knowledge", "--data", "{}", url],
                            capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["model"]["name"] == "sam2.1_hiera_tiny" and info["model"]["untrained"] is True
    listing = subprocess.run([buf, "curl", "--protocol", "grpc", "--http2-prior-knowledge", "--list-methods",
                              f"http://{server.address}"], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert "sam2serve.v1.AutoSegmentService/Subscribe" in listing.stdout


def test_webhook_is_called_when_a_queued_request_ends(tiny_engine):
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    received: list[dict] = []
    arrived = threading.Event()

    class Hook(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def do_POST(self) -> None:
            received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(204)
            self.end_headers()
            arrived.set()

    hook = ThreadingHTTPServer(("127.0.0.1", 0), Hook)
    threading.Thread(target=hook.serve_forever, daemon=True).start()
    server = ServerThread(ServerConfig(allow_private_urls=True), tiny_engine)  # the hook listens on loopback
    try:
        url = f"http://127.0.0.1:{hook.server_address[1]}/done"
        request_id = server.stub.Submit(quick_request(webhook_url=url), timeout=10).request_id
        assert arrived.wait(120)
        assert received == [{"request_id": request_id, "status": "COMPLETED"}]
    finally:
        server.stop()
        hook.shutdown()


def test_tls(tiny_engine, tmp_path):
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True, timeout=60)
    server = ServerThread(ServerConfig(tls_cert=str(cert), tls_key=str(key)), tiny_engine)
    try:
        with grpc.secure_channel(server.address, grpc.ssl_channel_credentials(cert.read_bytes())) as channel:
            from sam2serve.v1 import sam2serve_pb2_grpc as pb_grpc

            assert pb_grpc.AutoSegmentServiceStub(channel).GetInfo(pb.GetInfoRequest(), timeout=30).model.name
        with pytest.raises(grpc.RpcError):  # plaintext is refused
            server.stub.GetInfo(pb.GetInfoRequest(), timeout=5)
    finally:
        server.stop()
