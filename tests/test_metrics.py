"""Metrics: the right series after real calls, valid exposition (promtool), and a real Prometheus server
scraping a running sam2serve and answering PromQL."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import needs_export_tools, require
from grpc_harness import ServerThread, quick_request
from sam2serve.config import ServerConfig

pytestmark = needs_export_tools


TOKEN = "scrape-s3cret"


@pytest.fixture(scope="module")
def server(tiny_engine):
    s = ServerThread(ServerConfig(queue_size=4, metrics_token=TOKEN), tiny_engine)
    s.stub.AutoSegment(quick_request(), timeout=120)
    with pytest.raises(grpc.RpcError):
        s.stub.AutoSegment(quick_request(points_per_side=0), timeout=30)
    yield s
    s.stop()


def scrape(server: ServerThread, token: str | None = TOKEN) -> str:
    request = urllib.request.Request(f"http://127.0.0.1:{server.running.metrics_port}/metrics")
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    with urllib.request.urlopen(request, timeout=10) as r:
        return r.read().decode()


def test_metrics_need_the_token_when_one_is_set(server):
    for token in (None, "wrong", TOKEN + "x"):
        with pytest.raises(urllib.error.HTTPError) as refused:
            scrape(server, token)
        assert refused.value.code == 401
    assert "sam2serve_build_info" in scrape(server)


def test_metrics_listen_on_this_host_only_unless_told(tiny_engine):
    """gRPC on every interface does not put the metrics there too: build info, model and counters stay on
    loopback unless metrics_host says otherwise (the chart sets 0.0.0.0 for Prometheus)."""
    import asyncio

    from sam2serve.app import start_server

    async def bound() -> list[str]:
        addresses = []
        for config in (ServerConfig(host="0.0.0.0", port=0, metrics_port=0),
                       ServerConfig(host="0.0.0.0", port=0, metrics_port=0, metrics_host="0.0.0.0")):
            running = await start_server(config, tiny_engine)
            addresses.append(running._metrics_http.server_address[0])
            await running.shutdown()
        return addresses

    assert asyncio.run(bound()) == ["127.0.0.1", "0.0.0.0"]


def samples(text: str) -> dict[tuple[str, frozenset], float]:
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_series_after_real_calls(server):
    got = samples(scrape(server))
    grpc_call = {"protocol": "grpc", "rpc": "AutoSegment"}
    assert got[("sam2serve_requests_total", frozenset({**grpc_call, "code": "OK"}.items()))] >= 1
    assert got[("sam2serve_requests_total", frozenset({**grpc_call, "code": "INVALID_ARGUMENT"}.items()))] >= 1
    assert got[("sam2serve_rejected_requests_total",
                frozenset({"reason": "invalid_argument", "protocol": "grpc"}.items()))] >= 1
    assert got[("sam2serve_untrained_weights", frozenset())] == 1
    build = [labels for (name, labels) in got if name == "sam2serve_build_info"]
    assert build and dict(build[0])["untrained"] == "true" and dict(build[0])["model"] == "sam2.1_hiera_tiny"
    assert dict(build[0])["encoder_precision"] == "fp32"
    for stage in ("image", "encoder", "decoder", "postprocess", "output"):
        assert got[("sam2serve_stage_duration_seconds_count", frozenset({"stage": stage}.items()))] >= 1
    assert got[("sam2serve_job_duration_seconds_count", frozenset({"outcome": "completed"}.items()))] >= 1
    assert got[("sam2serve_masks_per_image_count", frozenset())] >= 1
    assert got[("sam2serve_queue_depth", frozenset())] == 0 and got[("sam2serve_jobs_in_progress", frozenset())] == 0
    assert not any("request_id" in dict(labels) for _, labels in got)


def test_promtool_accepts_the_exposition(server):
    promtool = shutil.which("promtool")
    require(promtool is not None, "promtool (Debian package prometheus) is not installed")
    assert promtool is not None
    result = subprocess.run([promtool, "check", "metrics"], input=scrape(server), capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_real_prometheus_scrapes_and_answers_promql(server, tmp_path):
    binary = shutil.which("prometheus")
    require(binary is not None, "prometheus (Debian package prometheus) is not installed")
    assert binary is not None
    config = tmp_path / "prometheus.yml"
    config.write_text(json.dumps({"global": {"scrape_interval": "1s"}, "scrape_configs": [
        {"job_name": "sam2serve", "authorization": {"credentials": TOKEN},
         "static_configs": [{"targets": [f"127.0.0.1:{server.running.metrics_port}"]}]}]}))
    port = _free_port()
    proc = subprocess.Popen([binary, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'data'}",
                             f"--web.listen-address=127.0.0.1:{port}"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    query = urllib.parse.quote('sum(sam2serve_requests_total{rpc="AutoSegment",code="OK"})')
    deadline, value = time.monotonic() + 90, None
    try:
        while time.monotonic() < deadline and value is None:  # poll Prometheus's API until it has scraped us
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v1/query?query={query}", timeout=5) as r:
                    result = json.loads(r.read())["data"]["result"]
                value = float(result[0]["value"][1]) if result else None
            except OSError:
                value = None
            if value is None:
                time.sleep(0.5)
    finally:
        proc.terminate()
        proc.wait(30)
    assert value is not None and value >= 1
