"""fal's HTTP API at the HTTP level (httpx, as curl would): the server-sent event stream, result files (key,
expiry), fal's error shapes for bad input, uploads, the proxy URL, and the metrics' protocol label."""

from __future__ import annotations

import socket
import time
import urllib.request

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import needs_export_tools
from fal_harness import APP, KEY, PNG, QUICK, SLOW, data_uri, sse_events
from grpc_harness import ServerThread
from sam2serve.config import ServerConfig

pytestmark = needs_export_tools
QUEUE = "/queue/fal-ai/sam2/requests"


@pytest.fixture(scope="module")
def server(tiny_engine):
    s = ServerThread(ServerConfig(workers=1, queue_size=4, api_key=KEY, http_port=0), tiny_engine)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.http_base, headers={"Authorization": f"Key {KEY}"}, timeout=300) as client:
        yield client


@pytest.fixture(scope="module")
def short_lived(tiny_engine):
    """Results kept 2 s, images of at most 100 kB."""
    s = ServerThread(ServerConfig(http_port=0, api_key=KEY, result_ttl_seconds=2, max_image_bytes=100_000),
                     tiny_engine)
    yield s
    s.stop()


def submit(http: httpx.Client, **fields: object) -> str:
    response = http.post(f"/queue/{APP}", json={"image_url": data_uri(), **QUICK, **fields})
    assert response.status_code == 200, response.text
    return response.json()["request_id"]


def test_the_status_stream_is_server_sent_events_ending_at_completion(http):
    request_id = submit(http)
    events = list(sse_events(http, f"{QUEUE}/{request_id}/status/stream?logs=1"))
    order = {"IN_QUEUE": 0, "IN_PROGRESS": 1, "COMPLETED": 2}
    states = [order[e["status"]] for e in events]
    assert states == sorted(states) and states[-1] == 2 and {e["request_id"] for e in events} == {request_id}
    assert any(e["status"] == "IN_PROGRESS" and "progress" in e for e in events) or states[0] == 2
    # each event carries the log entries added since the one before: together they are the request's logs
    streamed = [entry for e in events for entry in e["logs"]]
    assert streamed == http.get(f"{QUEUE}/{request_id}/status", params={"logs": 1}).json()["logs"]
    assert "UNTRAINED" in streamed[0]["message"] and streamed[0]["level"] == "WARN"
    assert events[-1]["metrics"]["inference_time"] > 0

    # a finished request's stream is its final status, then the end; an unknown one is a 404 before any stream
    [final] = list(sse_events(http, f"{QUEUE}/{request_id}/status/stream"))
    assert final["status"] == "COMPLETED" and final["logs"] is None
    unknown = http.get(f"{QUEUE}/no-such-id/status/stream")
    assert unknown.status_code == 404 and unknown.json()["error_type"] == "not_found"
    assert http.get(f"{QUEUE}/{request_id}/status/stream", headers={"Authorization": "Key nope"}).status_code == 401


def test_result_files_need_the_key_and_expire_with_the_result(short_lived):
    with httpx.Client(base_url=short_lived.http_base, headers={"Authorization": f"Key {KEY}"}, timeout=300) as http:
        response = http.post(f"/{APP}", json={"image_url": data_uri(), **QUICK})
        assert response.status_code == 200, response.text
        request_id = response.headers["x-fal-request-id"]
        output = response.json()
        url = output["combined_mask"]["url"]
        assert url == f"{short_lived.http_base}/files/{request_id}/combined_mask.png"
        picture = http.get(url)
        assert picture.status_code == 200 and picture.content[:8] == b"\x89PNG\r\n\x1a\n"
        assert len(picture.content) == output["combined_mask"]["file_size"]
        assert picture.headers["cache-control"] in ("private, max-age=0", "private, max-age=1", "private, max-age=2")
        assert httpx.get(url).status_code == 401
        assert http.get(f"/files/{request_id}/no_such_file.png").status_code == 404
        deadline = time.monotonic() + 60
        while (gone := http.get(url)).status_code == 200 and time.monotonic() < deadline:
            time.sleep(0.2)  # the result's time to live passing, not a synchronisation
        assert gone.status_code == 404 and gone.json()["error_type"] == "not_found"
        assert http.get(f"{QUEUE}/{request_id}").status_code == 404


@pytest.mark.parametrize(("body", "field", "message"), [
    ({}, "image_url", "image_url is required"),
    ({"image_url": ""}, "image_url", "image_url is required"),
    ({"image_url": data_uri(), "output_format": "gif"}, "output_format", "output_format must be one of png, jpeg"),
    ({"image_url": data_uri(), "sync_mode": "yes"}, "sync_mode", "sync_mode must be true or false"),
    ({"image_url": data_uri(), "points_per_side": 4.5}, "points_per_side", "points_per_side must be an integer"),
    ({"image_url": data_uri(), "pred_iou_thresh": "high"}, "pred_iou_thresh", "pred_iou_thresh must be a number"),
    ({"image_url": data_uri(), "stability_score_thresh": 2}, "stability_score_thresh", "must be between 0 and 1"),
    ({"image_url": data_uri(), "colour": "red"}, "colour", "unknown field 'colour'"),
    ([data_uri()], None, "the request body must be a JSON object"),
])
def test_bad_input_is_a_422_in_fals_shape(http, body, field, message):
    response = http.post(f"/queue/{APP}", json=body)
    assert response.status_code == 422 and response.headers["x-fal-error-type"] == "value_error"
    [detail] = response.json()["detail"]
    assert detail["loc"] == (["body", field] if field else ["body"]) and message in detail["msg"]
    assert detail["type"] == "value_error" and detail["url"].startswith("https://docs.fal.ai/errors")


@pytest.mark.parametrize(("hook", "message"), [
    ("http://127.0.0.1:9/hook", "webhook_url points at 127.0.0.1, a loopback address"),
    ("http://169.254.169.254/hook", "webhook_url points at 169.254.169.254, a cloud metadata address"),
    ("http://192.168.1.20/hook", "a private address"),
    ("gopher://example.com/hook", "webhook_url must be an http or https URL"),
])
def test_a_fal_webhook_the_address_rules_refuse_is_a_422_at_submit(http, hook, message):
    response = http.post(f"/queue/{APP}", params={"fal_webhook": hook}, json={"image_url": data_uri(), **QUICK})
    assert response.status_code == 422, response.text
    [detail] = response.json()["detail"]
    assert detail["loc"] == ["query", "fal_webhook"] and message in detail["msg"]


def test_unreadable_bodies_and_other_apps(http, short_lived):
    broken = http.post(f"/queue/{APP}", content=b"{not json", headers={"Content-Type": "application/json"})
    assert broken.status_code == 422 and "not valid JSON" in broken.json()["detail"][0]["msg"]
    other = http.post("/queue/fal-ai/flux/dev", json={"prompt": "a cat"})
    assert other.status_code == 404 and f"serves {APP}" in other.json()["detail"]
    big = httpx.post(f"{short_lived.http_base}/{APP}", headers={"Authorization": f"Key {KEY}"},
                     json={"image_url": data_uri(b"\x00" * 1_200_000)}, timeout=60)
    assert big.status_code == 422 and big.json()["detail"][0]["type"] == "image_too_large"


def test_an_upload_takes_one_put_and_is_read_back(http, server):
    issued = http.post("/storage/upload/initiate?storage_type=fal-cdn-v3",
                       json={"content_type": "image/png", "file_name": "x.png"})
    assert issued.status_code == 200
    upload_url, file_url = issued.json()["upload_url"], issued.json()["file_url"]
    assert upload_url.startswith(f"{server.http_base}/fal/uploads/")
    assert httpx.put(upload_url, content=PNG).status_code == 200  # no key: the URL is the permission
    assert httpx.put(upload_url, content=b"other").status_code == 404  # once
    assert httpx.put(f"{server.http_base}/fal/uploads/{'x' * 32}", content=PNG).status_code == 404
    assert http.get(file_url).content == PNG and httpx.get(file_url).status_code == 401
    assert httpx.post(f"{server.http_base}/storage/upload/initiate", json={}).status_code == 401


def test_a_put_to_an_unissued_token_is_refused_without_reading_its_body(server):
    """The PUT is unauthenticated: a made-up token must not make the server read up to the image cap."""
    port = int(server.http_base.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=30) as conn:
        conn.sendall(f"PUT /fal/uploads/{'x' * 32} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                     f"Content-Length: {10 * 1024 * 1024}\r\n\r\n".encode())  # and no body follows
        status_line = conn.makefile("rb").readline()  # a server waiting for the body times this out
    assert status_line.startswith(b"HTTP/1.1 404"), status_line


def test_http_connections_are_bounded_by_max_concurrent_rpcs(tiny_engine):
    s = ServerThread(ServerConfig(http_port=0, api_key=KEY, max_concurrent_rpcs=2), tiny_engine)
    try:
        with httpx.Client(base_url=s.http_base, headers={"Authorization": f"Key {KEY}"}, timeout=60) as first:
            assert first.get(f"{QUEUE}/no-such-id/status").status_code == 404  # its connection stays open
            assert httpx.get(f"{s.http_base}{QUEUE}/no-such-id/status", timeout=60).status_code == 503  # 2 open
            assert first.get(f"{QUEUE}/no-such-id/status").status_code == 404
    finally:
        s.stop()


def test_the_status_stream_answers_fals_errors_before_it_starts(tiny_engine):
    """Errors of the stream's first step are fal's status codes, not a 200 and a cut connection."""
    s = ServerThread(ServerConfig(http_port=0, api_key=KEY, max_status_streams=1), tiny_engine)
    try:
        with httpx.Client(base_url=s.http_base, headers={"Authorization": f"Key {KEY}"}, timeout=300) as http:
            unknown = http.get(f"{QUEUE}/{'0' * 32}/status/stream")
            assert unknown.status_code == 404 and unknown.json()["error_type"] == "not_found"
            request_id = submit(http, **SLOW)
            with http.stream("GET", f"{QUEUE}/{request_id}/status/stream") as first:
                assert first.status_code == 200
                lines = first.iter_lines()  # kept: a dropped iterator closes the connection
                assert next(lines).startswith("data:")  # open, and counted by the server
                over = http.get(f"{QUEUE}/{request_id}/status/stream")
                assert over.status_code == 429, over.text
                assert over.json()["error_type"] == "overloaded" and "status streams" in over.json()["detail"]
            http.put(f"{QUEUE}/{request_id}/cancel")
    finally:
        s.stop()


def test_the_proxy_url_serves_fal_urls_only(http):
    request_id = submit(http, points_per_side=1)
    direct = http.get(f"{QUEUE}/{request_id}/status")
    proxied = http.get("/fal/proxy", headers={
        "x-fal-target-url": f"https://queue.fal.run/fal-ai/sam2/requests/{request_id}/status"})
    assert proxied.status_code == 200 and proxied.json()["request_id"] == direct.json()["request_id"] == request_id
    for target in ("", "https://example.com/fal-ai/sam2/auto-segment", "http://fal.run/fal-ai/sam2/auto-segment"):
        refused = http.post("/fal/proxy", headers={"x-fal-target-url": target} if target else {}, json={})
        assert refused.status_code == 400 and "x-fal-target-url" in refused.json()["detail"]
    http.put(f"{QUEUE}/{request_id}/cancel")


def test_http_calls_are_counted_with_a_protocol_label(http, server):
    http.get(f"{QUEUE}/no-such-id/status")
    httpx.get(f"{server.http_base}{QUEUE}/no-such-id/status")
    http.post(f"/queue/{APP}", json={})
    with urllib.request.urlopen(f"http://127.0.0.1:{server.running.metrics_port}/metrics", timeout=10) as r:
        got = {(s.name, frozenset(s.labels.items())): s.value
               for family in text_string_to_metric_families(r.read().decode()) for s in family.samples}
    http_call = {"protocol": "http", "rpc": "GetStatus"}
    assert got[("sam2serve_requests_total", frozenset({**http_call, "code": "404"}.items()))] >= 1
    assert got[("sam2serve_requests_total", frozenset({**http_call, "code": "401"}.items()))] >= 1
    assert got[("sam2serve_request_duration_seconds_count", frozenset(http_call.items()))] >= 3
    for reason in ("unauthenticated", "invalid_argument"):
        assert got[("sam2serve_rejected_requests_total", frozenset({"reason": reason, "protocol": "http"}.items()))]


def test_a_synchronous_caller_that_leaves_takes_its_job_with_it(server):
    def cancelled() -> float:
        with urllib.request.urlopen(f"http://127.0.0.1:{server.running.metrics_port}/metrics", timeout=10) as r:
            return next((s.value for family in text_string_to_metric_families(r.read().decode())
                         for s in family.samples if s.name == "sam2serve_job_duration_seconds_count"
                         and s.labels == {"outcome": "cancelled"}), 0.0)

    before = cancelled()
    with httpx.Client(base_url=server.http_base, headers={"Authorization": f"Key {KEY}"}) as http:
        request_id = submit(http, points_per_side=32)  # holds the worker, so the synchronous call's job waits
        with pytest.raises(httpx.ReadTimeout):
            http.post(f"/{APP}", json={"image_url": data_uri(), **QUICK}, timeout=httpx.Timeout(60, read=2))
        http.put(f"{QUEUE}/{request_id}/cancel")
        deadline = time.monotonic() + 300
        while cancelled() < before + 2 and time.monotonic() < deadline:
            time.sleep(0.2)  # both cancellations reaching the job layer; the counter is what is awaited
    assert cancelled() == before + 2


# -- fal-ai/sam2/image: prompts on the prompt data plane ------------------------------------------------------
IMAGE_APP = "/fal-ai/sam2/image"
CLICK = [{"x": 10, "y": 10}]


@pytest.mark.parametrize(("body", "field", "message"), [
    ({"prompts": CLICK}, "image_url", "image_url is required"),
    ({"image_url": data_uri()}, "prompts", "no prompt: give at least one point (prompts) or one box (box_prompts)"),
    ({"image_url": data_uri(), "prompts": [{"x": 400, "y": 10}]}, "prompts",
     "prompts[0] = (400, 10) lies outside the 320x240 image"),
    ({"image_url": data_uri(), "box_prompts": [{"x_min": 200, "y_min": 10, "x_max": 100, "y_max": 90}]},
     "box_prompts", "box_prompts[0] = (200, 10, 100, 90) is inverted or empty"),
    ({"image_url": data_uri(), "box_prompts": [{"x_min": 0, "y_min": 0, "x_max": 100, "y_max": 241}]},
     "box_prompts", "box_prompts[0] = (0, 0, 100, 241) reaches outside the 320x240 image"),
    ({"image_url": data_uri(), "prompts": CLICK * 65}, "prompts", "65 points, over this server's limit of 64"),
    ({"image_url": data_uri(), "prompts": [{"x": 10, "y": 10, "label": 2}]}, "prompts",
     "prompts[0].label must be 1 (foreground) or 0 (background)"),
    ({"image_url": data_uri(), "prompts": [{"x": "10", "y": 10}]}, "prompts", "prompts[0].x must be a number"),
    ({"image_url": data_uri(), "prompts": [{"x": 1, "y": 1, "z": 3}]}, "prompts", "unknown key 'z'"),
    ({"image_url": data_uri(), "prompts": {"x": 1, "y": 1}}, "prompts", "prompts must be a list"),
    ({"image_url": data_uri(), "box_prompts": [[0, 0, 10, 10]]}, "box_prompts", "box_prompts[0] must be an object"),
    ({"image_url": data_uri(), "prompts": CLICK, "output_format": "gif"}, "output_format",
     "output_format must be one of png, jpeg, webp"),
    ({"image_url": data_uri(), "prompts": CLICK, "apply_mask": 1}, "apply_mask", "apply_mask must be true or false"),
    ({"image_url": data_uri(), "prompts": CLICK, "points_per_side": 4}, "points_per_side",
     "unknown field 'points_per_side'"),
])
def test_bad_prompts_are_a_422_in_fals_shape(http, body, field, message):
    response = http.post(IMAGE_APP, json=body)
    assert response.status_code == 422, response.text
    assert response.headers["x-fal-error-type"] == "value_error"
    [detail] = response.json()["detail"]
    assert detail["loc"] == ["body", field] and message in detail["msg"]
    assert detail["type"] == "value_error" and detail["url"].startswith("https://docs.fal.ai/errors")


def test_a_nan_prompt_is_refused_and_counted(http, server):
    # NaN is not JSON, but Python's json module (which reads the body here) takes it: the prompt checks catch it
    body = b'{"image_url": "%s", "prompts": [{"x": NaN, "y": 1}]}' % data_uri().encode()
    response = http.post(IMAGE_APP, content=body, headers={"Content-Type": "application/json"})
    assert response.status_code == 422
    assert response.json()["detail"][0]["msg"] == "prompts[0] = (nan, 1.0): coordinates must be finite numbers"
    registry = server.running.app.metrics.registry
    assert registry.get_sample_value("sam2serve_requests_total",
                                     {"rpc": "Segment", "code": "422", "protocol": "http"}) >= 1
    # the prompt data plane counts with the same reasons as every refusal
    assert registry.get_sample_value("sam2serve_rejected_requests_total",
                                     {"reason": "invalid_argument", "protocol": "http"}) >= 1
    assert http.post(f"/queue{IMAGE_APP}", json={"image_url": data_uri(), "prompts": CLICK}).status_code == 404
