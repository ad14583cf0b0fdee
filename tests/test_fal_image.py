"""fal's prompted app `fal-ai/sam2/image` through fal's own Python client (fal_client.run, as fal.run serves it)
against `sam2serve serve --http-port` over TLS on loopback: a point and a box give exactly the mask that gRPC's
`Segment` gives for the same prompt; the output is fal's `{"image": File}`, inline or as a URL of this server;
and the queue refuses the app with a message that says why (it runs auto-segment jobs only)."""

from __future__ import annotations

import base64

import cv2
import numpy as np
import pytest

from conftest import import_required, needs_export_tools
from fal_harness import KEY, PNG, data_uri, deploy
from grpc_harness import decode_png
from sam2serve.v1 import sam2serve_pb2 as pb
from sam2serve.v1 import sam2serve_pb2_grpc as pb_grpc

fal_client = import_required("fal_client", "fal-client is not installed (the dev extra)")
from fal_client import FalClientHTTPError  # noqa: E402

pytestmark = needs_export_tools
APP = "fal-ai/sam2/image"
POINT = {"x": 160, "y": 120, "label": 1}
BOX = {"x_min": 60, "y_min": 40, "x_max": 250, "y_max": 200}


@pytest.fixture(scope="module")
def deployment(tiny_engine, tls_files):
    d = deploy("memory", tiny_engine, tls_files)
    yield d
    d.stop()


@pytest.fixture(scope="module")
def fal(deployment):
    """fal's client pointed at the server as the README's FAL_RUN_HOST / FAL_QUEUE_RUN_HOST point it."""
    patch = pytest.MonkeyPatch()
    host = f"127.0.0.1:{deployment.front.running.http_port}"
    patch.setenv("SSL_CERT_FILE", str(deployment.tls.ca))
    patch.setattr(fal_client.client, "RUN_URL_FORMAT", f"https://{host}/")
    patch.setattr(fal_client.client, "QUEUE_URL_FORMAT", f"https://{host}/queue/")
    client = fal_client.SyncClient(key=KEY)
    yield client
    client._client.close()
    patch.undo()


def grpc_mask(deployment, **prompt: object) -> np.ndarray:
    """gRPC Segment's answer for the same prompt, as fal's app asks it (SAM 2's single mask): its best mask."""
    stub = pb_grpc.PromptSegmentServiceStub(deployment.front.channel)
    response = stub.Segment(pb.SegmentRequest(image_bytes=PNG, multimask_output=False, **prompt), timeout=300,
                            metadata=(("authorization", f"Key {KEY}"),))
    [result] = response.results
    return decode_png(result.masks[result.best_index].image.data) > 0


def picture(data: bytes) -> np.ndarray:
    return cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)


def inline(file: dict) -> bytes:
    header, _, payload = file["url"].partition(",")
    assert header == f"data:{file['content_type']};base64", header
    return base64.b64decode(payload)


def test_a_point_gives_grpcs_mask_inline(fal, deployment):
    output = fal.run(APP, {"image_url": data_uri(), "prompts": [POINT], "sync_mode": True})
    assert set(output) == {"image"}
    image = output["image"]
    assert set(image) == {"url", "content_type", "file_name", "file_size", "width", "height"}
    assert (image["width"], image["height"], image["content_type"]) == (320, 240, "image/png")
    data = inline(image)
    assert len(data) == image["file_size"]
    mask = picture(data) > 0
    expected = grpc_mask(deployment, points=[pb.PointPrompt(**POINT)])
    assert expected.any()  # untrained weights still give a mask here: the comparison is not of two empties
    np.testing.assert_array_equal(mask, expected)


def test_a_box_gives_grpcs_mask_as_a_url_of_this_server(fal, deployment):
    output = fal.run(APP, {"image_url": data_uri(), "box_prompts": [BOX]})
    image = output["image"]
    assert image["url"].startswith(f"{deployment.front.http_base}/fal/uploads/")
    assert image["url"].endswith("/mask.png")
    with deployment.http() as http:
        response = http.get(image["url"])
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"
    assert len(response.content) == image["file_size"]
    np.testing.assert_array_equal(picture(response.content) > 0, grpc_mask(deployment, boxes=[pb.BoxPrompt(**BOX)]))
    with deployment.http(key=None) as http:
        assert http.get(image["url"]).status_code == 401  # the same key as every other call


def test_apply_mask_cuts_the_photo_out_in_webp(fal, deployment):
    output = fal.run(APP, {"image_url": data_uri(), "prompts": [POINT], "box_prompts": [BOX], "apply_mask": True,
                           "output_format": "webp", "sync_mode": True})
    image = output["image"]
    assert image["content_type"] == "image/webp" and image["file_name"] == "masked.webp"
    bgra = picture(inline(image))
    assert bgra.shape == (240, 320, 4)
    expected = grpc_mask(deployment, points=[pb.PointPrompt(**POINT)], boxes=[pb.BoxPrompt(**BOX)])
    np.testing.assert_array_equal(bgra[..., 3] > 0, expected)
    photo = decode_png(PNG)  # lossless WebP: the photo's pixels inside the mask
    np.testing.assert_array_equal(bgra[..., :3][expected], photo[expected])


def test_a_bad_prompt_is_fals_422(fal):
    with pytest.raises(FalClientHTTPError) as outside:
        fal.run(APP, {"image_url": data_uri(), "prompts": [{"x": 400, "y": 10}]})
    assert outside.value.status_code == 422 and "prompts[0] = (400, 10) lies outside the 320x240 image" in str(
        outside.value)
    assert outside.value.response.json()["detail"][0]["loc"] == ["body", "prompts"]


def test_the_queue_refuses_the_prompted_app_and_says_why(fal):
    with pytest.raises(FalClientHTTPError) as refused:
        fal.submit(APP, {"image_url": data_uri(), "prompts": [POINT]})
    assert refused.value.status_code == 404
    assert "synchronously" in str(refused.value) and "fal_client.run" in str(refused.value)
