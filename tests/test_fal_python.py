"""fal's own Python client (PyPI fal-client, pinned) against `sam2serve serve --http-port` on loopback, over
TLS with a throwaway certificate (the client speaks https only), with the in-process queue and with two
replicas sharing a Redis queue (every call after a submission then goes to the other replica)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import import_required, needs_export_tools
from fal_harness import (
    APP,
    KEY,
    QUICK,
    SLOW,
    WebhookReceiver,
    assert_file_object,
    assert_same_masks,
    data_uri,
    decoded,
    deploy,
)
from httpfiles import FileHost

fal_client = import_required("fal_client", "fal-client is not installed (the dev extra)")
from fal_client import Completed, FalClientHTTPError, InProgress, Queued  # noqa: E402

pytestmark = needs_export_tools


@pytest.fixture(scope="module", params=["memory", "redis"])
def deployment(request, tiny_engine, tls_files):
    redis_url = request.getfixturevalue("redis_url") if request.param == "redis" else ""
    d = deploy(request.param, tiny_engine, tls_files, redis_url)
    yield d
    d.stop()


def hosts(deployment) -> dict[str, str]:
    """The settings a fal user changes (README): FAL_RUN_HOST, FAL_QUEUE_RUN_HOST, and the key."""
    host = f"127.0.0.1:{deployment.front.running.http_port}"
    return {"FAL_KEY": KEY, "FAL_RUN_HOST": host, "FAL_QUEUE_RUN_HOST": f"{host}/queue"}


@pytest.fixture(scope="module")
def fal(deployment):
    """A client pointed at the deployment as those settings point it (they are read when fal_client is
    imported, so here the module's URL prefixes are set to what they make), trusting the test's CA."""
    patch = pytest.MonkeyPatch()
    settings = hosts(deployment)
    patch.setenv("SSL_CERT_FILE", str(deployment.tls.ca))
    patch.setattr(fal_client.client, "RUN_URL_FORMAT", f"https://{settings['FAL_RUN_HOST']}/")
    patch.setattr(fal_client.client, "QUEUE_URL_FORMAT", f"https://{settings['FAL_QUEUE_RUN_HOST']}/")
    client = fal_client.SyncClient(key=KEY)
    yield client
    client._client.close()  # its pooled TLS connections would hold the server's shutdown
    patch.undo()


@pytest.fixture(scope="module")
def webhooks():
    receiver = WebhookReceiver()
    yield receiver
    receiver.close()


@pytest.fixture(scope="module")
def missing_image_url():
    with FileHost() as host:
        yield f"{host.base_url}/missing.png"


def in_progress(handle) -> None:
    for status in handle.iter_events(interval=0.05):
        if isinstance(status, InProgress):
            return
    raise AssertionError(f"{handle.request_id} ended before it was seen in progress")


def ended(handle) -> Completed:
    *_, last = handle.iter_events(with_logs=True, interval=0.1)
    return last


def test_the_readme_settings_reach_both_hosts(deployment, missing_image_url):
    """The README's environment, as a user sets it before starting Python: the queue and the run host."""
    script = ("import fal_client, sys\n"
              "for call in (fal_client.run, lambda app, args: fal_client.submit(app, args).get()):\n"
              "    try:\n"
              f"        call({APP!r}, {{'image_url': sys.argv[1]}})\n"
              "    except fal_client.client.FalClientHTTPError as e:\n"
              "        print(e.status_code, e.response.url, e)\n")
    env = {**os.environ, **hosts(deployment), "SSL_CERT_FILE": str(deployment.tls.ca)}
    done = subprocess.run([sys.executable, "-c", script, missing_image_url], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    run, queued = done.stdout.splitlines()
    host = hosts(deployment)["FAL_RUN_HOST"]
    assert run.startswith(f"422 https://{host}/{APP} ") and "returned HTTP 404" in run
    assert queued.startswith("422 ") and "/queue/fal-ai/sam2/requests/" in queued and "returned HTTP 404" in queued


def test_subscribe_sees_its_place_in_the_queue_progress_and_logs(fal, deployment):
    blocker = fal.submit(APP, {"image_url": data_uri(), **SLOW})
    in_progress(blocker)  # the only worker is busy: the next request waits
    seen = []

    def update(status) -> None:
        seen.append(status)
        if isinstance(status, Queued) and len([s for s in seen if isinstance(s, Queued)]) == 1:
            blocker.cancel()  # once the client has seen its place, free the worker (cancelled in progress)

    result = fal.subscribe(APP, {"image_url": data_uri(), **QUICK}, with_logs=True, on_queue_update=update)
    queued = [s for s in seen if isinstance(s, Queued)]
    running = [s for s in seen if isinstance(s, InProgress)]
    assert queued and queued[0].position == 0 and running and isinstance(seen[-1], Completed)
    logs = seen[-1].logs
    assert logs[0]["level"] == "WARN" and "UNTRAINED" in logs[0]["message"]
    assert any(entry["message"].startswith("image: PNG 320x240") for s in running for entry in s.logs)
    assert seen[-1].metrics["inference_time"] > 0 and seen[-1].metrics["queue_time"] > 0

    assert set(result) == {"combined_mask", "individual_masks"} and result["individual_masks"]
    for file in (result["combined_mask"], *result["individual_masks"]):
        assert_file_object(file)
        assert file["url"].startswith(f"{deployment.back.http_base}/files/")
    with deployment.http(deployment.back) as http:
        picture = http.get(result["combined_mask"]["url"])
        assert picture.status_code == 200 and picture.headers["content-type"] == "image/png"
        assert decoded(picture).shape == (240, 320, 3) and len(picture.content) == result["combined_mask"]["file_size"]

    final = ended(blocker)  # cancelled while it ran
    assert isinstance(final, Completed) and final.error_type == "client_cancelled"
    with pytest.raises(FalClientHTTPError) as cancelled:
        blocker.get()
    assert cancelled.value.status_code == 499 and "was cancelled" in str(cancelled.value)


def test_submit_status_result_and_the_webhook(fal, deployment, webhooks):
    handle = fal.submit(APP, {"image_url": data_uri(), **QUICK}, webhook_url=webhooks.url)
    assert handle.status_url == f"{deployment.back.http_base}/queue/fal-ai/sam2/requests/{handle.request_id}/status"
    assert isinstance(handle.status(with_logs=True), Queued | InProgress | Completed)
    result = handle.get()
    assert fal.result(APP, handle.request_id) == result  # by id, as fal_client.result(app, id) asks for it
    assert webhooks.body_for(handle.request_id) == {"request_id": handle.request_id,
                                                    "gateway_request_id": handle.request_id, "status": "OK",
                                                    "payload": result, "error": None}


def test_cancel_in_the_queue_and_in_progress_and_a_full_queue(fal, monkeypatch):
    blocker = fal.submit(APP, {"image_url": data_uri(), **SLOW})
    in_progress(blocker)
    waiting = fal.submit(APP, {"image_url": data_uri(), **QUICK})
    assert waiting.status() == Queued(position=0)

    # fal-client retries a 429 up to 10 times over about a minute; two tries show what it finally raises
    monkeypatch.setattr(fal_client.client, "MAX_ATTEMPTS", 2)
    with pytest.raises(FalClientHTTPError) as full:
        fal.submit(APP, {"image_url": data_uri(), **QUICK})
    assert full.value.status_code == 429 and "the queue is full (1 requests waiting)" in str(full.value)
    assert full.value.response.headers["x-fal-error-type"] == "queue_full"

    waiting.cancel()
    final = waiting.status()
    assert isinstance(final, Completed) and final.error_type == "client_cancelled" and "cancelled" in final.error
    with pytest.raises(FalClientHTTPError) as cancelled:
        waiting.get()
    assert cancelled.value.status_code == 499
    with pytest.raises(FalClientHTTPError) as again:
        waiting.cancel()
    assert again.value.status_code == 400 and "already ended" in str(again.value)

    blocker.cancel()
    assert ended(blocker).error_type == "client_cancelled"


def test_the_synchronous_call_returns_data_uris_of_the_grpc_answer(fal, deployment):
    output = fal.run(APP, {"image_url": data_uri(), "sync_mode": True, **QUICK})
    assert set(output) == {"combined_mask", "individual_masks"}
    assert_same_masks(output, deployment.grpc_answer(**QUICK))


def test_a_bad_image_url_fails_with_our_message(fal, webhooks, missing_image_url):
    with pytest.raises(FalClientHTTPError) as sync:
        fal.run(APP, {"image_url": missing_image_url})
    assert sync.value.status_code == 422 and "image_url returned HTTP 404 Not Found" in str(sync.value)
    assert sync.value.response.json()["detail"][0]["loc"] == ["body", "image_url"]

    handle = fal.submit(APP, {"image_url": missing_image_url}, webhook_url=webhooks.url)
    with pytest.raises(FalClientHTTPError) as queued:
        handle.get()
    assert queued.value.status_code == 422 and "image_url returned HTTP 404 Not Found" in str(queued.value)
    hook = webhooks.body_for(handle.request_id)
    assert hook["status"] == "ERROR" and hook["error"] == "Invalid status code: 422"
    assert hook["payload"]["detail"][0]["type"] == "file_download_error"
    assert "returned HTTP 404" in hook["payload"]["detail"][0]["msg"]

    with pytest.raises(FalClientHTTPError) as bad_parameter:
        fal.submit(APP, {"image_url": data_uri(), "points_per_side": 0})
    assert bad_parameter.value.status_code == 422
    assert json.loads(bad_parameter.value.response.text)["detail"][0]["loc"] == ["body", "points_per_side"]


def test_a_missing_or_wrong_key_is_refused(fal, deployment):
    with pytest.raises(FalClientHTTPError) as wrong:
        fal_client.SyncClient(key="not-the-key").submit(APP, {"image_url": data_uri(), **QUICK})
    assert wrong.value.status_code == 401 and "missing or invalid API key" in str(wrong.value)
    with deployment.http(key=None) as http:
        missing = http.post(f"/queue/{APP}", json={"image_url": data_uri()})
    assert missing.status_code == 401 and missing.json()["error_type"] == "unauthorized"
