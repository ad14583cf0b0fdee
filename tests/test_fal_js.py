"""fal's own JavaScript client (@fal-ai/client, pinned in tests/js) against `sam2serve serve --http-port`: one
node run of tests/js/fal_scenarios.mjs per queue mode, over TLS with a throwaway certificate. In-process it is
set up as the README says (proxyUrl); with Redis a request middleware sends each call to the next of two
replicas in turn, on fal's own paths, as a load balancer would."""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import needs_export_tools, require
from fal_harness import (
    APP,
    PNG,
    QUICK,
    SLOW,
    FalDeployment,
    WebhookReceiver,
    assert_file_object,
    assert_same_masks,
    deploy,
)
from httpfiles import FileHost
from sam2serve.v1 import sam2serve_pb2 as pb

pytestmark = needs_export_tools
NODE = shutil.which("node")
SCRIPTS = Path(__file__).resolve().parent / "js"


@dataclass
class JsRun:
    results: dict
    deployment: FalDeployment
    webhooks: WebhookReceiver
    grpc_answer: pb.AutoSegmentResponse

    def value(self, scenario: str) -> dict:
        entry = self.results[scenario]
        assert entry["ok"], json.dumps(entry["error"], indent=2)
        return entry["value"]


@pytest.fixture(scope="module", params=["memory", "redis"])
def js(request, tiny_engine, tls_files):
    require(NODE is not None, "node is not installed")
    require((SCRIPTS / "node_modules" / "@fal-ai" / "client" / "package.json").is_file(),
            "@fal-ai/client is not installed (npm ci in tests/js)")
    redis_url = request.getfixturevalue("redis_url") if request.param == "redis" else ""
    deployment = deploy(request.param, tiny_engine, tls_files, redis_url)
    webhooks = WebhookReceiver()
    try:
        with FileHost() as files:
            config = {"bases": list(dict.fromkeys([deployment.front.http_base, deployment.back.http_base])),
                      "key": deployment.front.running.config.api_key, "app": APP,
                      "png": base64.b64encode(PNG).decode(), "quick": QUICK, "slow": SLOW, "webhook": webhooks.url,
                      "missing": f"{files.base_url}/missing.png", "proxy": request.param == "memory"}
            env = {k: v for k, v in os.environ.items() if not k.startswith("FAL_")}
            env.update(FAL_SCENARIOS=json.dumps(config), NODE_EXTRA_CA_CERTS=str(tls_files.ca))
            done = subprocess.run([NODE, str(SCRIPTS / "fal_scenarios.mjs")], env=env, capture_output=True, text=True,
                                  timeout=1500)
        assert done.returncode == 0, done.stderr
        yield JsRun(json.loads(done.stdout.splitlines()[-1]), deployment, webhooks, deployment.grpc_answer(**QUICK))
    finally:
        webhooks.close()
        deployment.stop()


def test_subscribe_streams_its_place_in_the_queue_progress_and_logs(js):
    got = js.value("subscribe")
    statuses = [u["status"] for u in got["updates"]]
    assert statuses[0] == "IN_QUEUE" and "IN_PROGRESS" in statuses and statuses[-1] == "COMPLETED"
    assert got["updates"][0]["queue_position"] == 0
    logs = got["updates"][-1]["logs"]  # the client accumulates the stream's new entries
    messages = [entry["message"] for entry in logs]
    assert "UNTRAINED" in messages[0] and len(messages) == len(set(messages))
    assert any(m.startswith("image: PNG 320x240") for m in messages)  # the Blob, uploaded, then read back here
    assert got["requestId"] == got["updates"][0]["request_id"]
    assert set(got["data"]) == {"combined_mask", "individual_masks"} and got["data"]["individual_masks"]
    for file in (got["data"]["combined_mask"], *got["data"]["individual_masks"]):
        assert_file_object(file)
    with js.deployment.http(js.deployment.back) as http:
        assert http.get(got["data"]["combined_mask"]["url"]).content[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_request_cancelled_in_progress(js):
    got = js.value("cancelled_in_progress")
    assert got["status"]["error_type"] == "client_cancelled"
    assert got["result"]["status"] == 499 and "was cancelled" in got["result"]["body"]["detail"]


def test_submit_status_result_and_the_webhook(js):
    got = js.value("submit_status_result")
    request_id = got["requestId"]
    assert got["first"]["status"] in ("IN_QUEUE", "IN_PROGRESS", "COMPLETED")
    assert got["final"]["status"] == "COMPLETED" and got["final"]["metrics"]["inference_time"] > 0
    assert got["result"]["requestId"] == request_id
    assert js.webhooks.body_for(request_id) == {"request_id": request_id, "gateway_request_id": request_id,
                                                "status": "OK", "payload": got["result"]["data"], "error": None}


def test_cancel_in_the_queue_and_a_full_queue(js):
    got = js.value("cancel_in_queue_and_full_queue")
    assert got["waitingStatus"]["status"] == "IN_QUEUE" and got["waitingStatus"]["queue_position"] == 0
    assert got["full"]["status"] == 429 and "the queue is full" in got["full"]["body"]["detail"]
    assert got["waitingFinal"]["status"] == "COMPLETED" and got["waitingFinal"]["error_type"] == "client_cancelled"
    assert got["waitingResult"]["status"] == 499
    assert got["runningFinal"]["error_type"] == "client_cancelled"


def test_the_synchronous_call_returns_data_uris_of_the_grpc_answer(js):
    got = js.value("run_sync_mode")
    assert got["requestId"] and set(got["data"]) == {"combined_mask", "individual_masks"}
    assert_same_masks(got["data"], js.grpc_answer)


def test_a_bad_image_url_fails_with_our_message(js):
    got = js.value("bad_image_url")
    for error in (got["run"], got["subscribe"]):
        assert error["name"] == "ValidationError" and error["status"] == 422
        [field_error] = error["fieldErrors"]
        assert field_error["msg"].endswith("returned HTTP 404 Not Found")
        assert field_error["type"] == "file_download_error"


def test_a_missing_or_wrong_key_is_refused(js):
    got = js.value("keys")
    for error in (got["wrong"], got["missing"]):
        assert error["status"] == 401 and "missing or invalid API key" in error["body"]["detail"]
