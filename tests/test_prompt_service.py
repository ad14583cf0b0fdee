"""PromptSegmentService over gRPC on 127.0.0.1 with real (untrained tiny) engines: EmbedImage, Segment from an
image or an image_id, refinement by logits id, the cache (hit, miss, eviction, NOT_FOUND) and its metrics, bad
prompts, auth, deadlines, and the `sam2serve segment --point/--box` client."""

from __future__ import annotations

import argparse
import json

import cv2
import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from conftest import needs_export_tools
from grpc_harness import ServerThread, decode_png, png_bytes
from sam2serve.config import ServerConfig
from sam2serve.v1 import sam2serve_pb2 as pb
from sam2serve.v1 import sam2serve_pb2_grpc as pb_grpc

pytestmark = needs_export_tools
EMBEDDING_BYTES = (256 * 64 * 64 + 32 * 256 * 256 + 64 * 128 * 128) * 4  # ≈ 16.8 MB per image


def cached_bytes_per_image(engine) -> int:
    """What the cache counts per image: the features, and the factored decoder's context of them (≈ 45 MB)."""
    from sam2serve.preprocess import to_model_input

    m = engine.manifest
    features = engine.encode(to_model_input(np.zeros((8, 8, 3), np.uint8), m.image_size, m.pixel_mean, m.pixel_std))
    context = engine.factored.context(features) if engine.factored is not None else {}
    return EMBEDDING_BYTES + sum(int(t.nbytes) for t in context.values())


class PromptServer(ServerThread):
    def __init__(self, config: ServerConfig, engine: object) -> None:
        super().__init__(config, engine)
        self.prompts = pb_grpc.PromptSegmentServiceStub(self.channel)

    def metric(self, name: str, kind: str) -> float:
        value = self.running.app.metrics.registry.get_sample_value(name, {"kind": kind})
        return 0.0 if value is None else value


@pytest.fixture(scope="module")
def server(tiny_engine):
    s = PromptServer(ServerConfig(max_prompt_points=4, max_prompt_boxes=2), tiny_engine)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def embedded(server) -> pb.EmbedImageResponse:
    return server.prompts.EmbedImage(pb.EmbedImageRequest(image_bytes=png_bytes()), timeout=120)


def _click(**fields: object) -> pb.SegmentRequest:
    return pb.SegmentRequest(points=[pb.PointPrompt(x=160, y=120)], **fields)


def test_embed_then_click_on_the_cached_embedding(server, embedded):
    assert len(embedded.image_id) == 64 and (embedded.width, embedded.height) == (320, 240)
    assert not embedded.cached and embedded.timings.encoder_seconds > 0 and embedded.model.untrained
    again = server.prompts.EmbedImage(pb.EmbedImageRequest(image_bytes=png_bytes()), timeout=60)
    assert again.cached and again.image_id == embedded.image_id and again.timings.encoder_seconds == 0

    response = server.prompts.Segment(_click(image_id=embedded.image_id), timeout=60)
    assert response.cached and response.image_id == embedded.image_id
    assert (response.width, response.height) == (320, 240)
    assert response.timings.encoder_seconds == 0 and response.timings.decoder_seconds > 0
    [result] = response.results
    assert [m.index for m in result.masks] == [0, 1, 2]  # multimask by default, in token order
    assert result.best_index == int(np.argmax([m.score for m in result.masks]))
    for m in result.masks:
        picture = decode_png(m.image.data)
        assert picture.shape == (240, 320) and set(np.unique(picture)) <= {0, 255}
        assert int((picture > 0).sum()) == m.area and m.image.content_type == "image/png"
        if m.area:
            x, y, w, h = m.bbox
            ys, xs = np.nonzero(picture)
            assert (x, y, x + w, y + h) == (xs.min(), ys.min(), xs.max(), ys.max())
        assert m.logits_id and not m.HasField("rle")
    assert len({m.logits_id for m in result.masks}) == 3


def test_segment_with_the_image_finds_the_same_embedding(server, embedded):
    hits = server.metric("sam2serve_embedding_cache_hits_total", "image")
    response = server.prompts.Segment(_click(image_bytes=png_bytes(), multimask_output=False, return_rle=True,
                                             return_mask_images=False), timeout=60)
    assert response.image_id == embedded.image_id and response.cached
    assert server.metric("sam2serve_embedding_cache_hits_total", "image") == hits + 1
    [result] = response.results
    [mask] = result.masks
    assert not mask.HasField("image") and list(mask.rle.size) == [240, 320] and mask.rle.counts


def test_boxes_are_prompt_sets_and_jpeg_works(server, embedded):
    response = server.prompts.Segment(pb.SegmentRequest(
        image_id=embedded.image_id, boxes=[pb.BoxPrompt(x_min=10, y_min=10, x_max=150, y_max=120),
                                           pb.BoxPrompt(x_min=100, y_min=50, x_max=310, y_max=230)],
        points=[pb.PointPrompt(x=120, y=100, label=0)], output_format=pb.OUTPUT_FORMAT_JPEG), timeout=60)
    assert len(response.results) == 2 and all(len(r.masks) == 3 for r in response.results)
    assert response.results[0].masks[0].image.data[:2] == b"\xff\xd8"
    assert response.results[0].masks[0].image.file_name == "mask_00_0.jpg"
    assert response.results[1].masks[2].image.file_name == "mask_01_2.jpg"


def test_refine_with_an_earlier_masks_logits(server, embedded):
    first = server.prompts.Segment(_click(image_id=embedded.image_id, return_mask_images=False), timeout=60)
    best = first.results[0].masks[first.results[0].best_index]
    refined = server.prompts.Segment(pb.SegmentRequest(
        image_id=embedded.image_id, points=[pb.PointPrompt(x=160, y=120), pb.PointPrompt(x=40, y=40, label=0)],
        mask_input_id=best.logits_id, multimask_output=False), timeout=60)
    without = server.prompts.Segment(pb.SegmentRequest(
        image_id=embedded.image_id, points=[pb.PointPrompt(x=160, y=120), pb.PointPrompt(x=40, y=40, label=0)],
        multimask_output=False), timeout=60)
    assert refined.results[0].masks[0].score != without.results[0].masks[0].score  # the mask input was used

    other = server.prompts.EmbedImage(pb.EmbedImageRequest(image_bytes=png_bytes(seed=3)), timeout=120)
    with pytest.raises(grpc.RpcError) as wrong_image:
        server.prompts.Segment(_click(image_id=other.image_id, mask_input_id=best.logits_id), timeout=60)
    assert wrong_image.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "belongs to another image" in wrong_image.value.details()
    unknown = "0" * 32 + ".1"
    with pytest.raises(grpc.RpcError) as gone:
        server.prompts.Segment(_click(image_id=embedded.image_id, mask_input_id=unknown), timeout=60)
    assert gone.value.code() == grpc.StatusCode.NOT_FOUND and unknown in gone.value.details()


def test_unknown_image_id_is_not_found_with_a_message_to_resend(server):
    with pytest.raises(grpc.RpcError) as missing:
        server.prompts.Segment(_click(image_id="ab" * 32), timeout=30)
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND
    assert "not in this replica's embedding cache" in missing.value.details()
    assert "send the image again" in missing.value.details()


@pytest.mark.parametrize(("fields", "message"), [
    ({"points": [pb.PointPrompt(x=float("nan"), y=5)]}, "must be finite"),
    ({"points": [pb.PointPrompt(x=5, y=float("inf"))]}, "must be finite"),
    ({"points": [pb.PointPrompt(x=321, y=5)]}, "lies outside the 320x240 image"),
    ({"points": [pb.PointPrompt(x=-1, y=5)]}, "lies outside the 320x240 image"),
    ({"boxes": [pb.BoxPrompt(x_min=100, y_min=10, x_max=50, y_max=90)]}, "is inverted or empty"),
    ({"boxes": [pb.BoxPrompt(x_min=0, y_min=0, x_max=330, y_max=90)]}, "reaches outside the 320x240 image"),
    ({"points": [pb.PointPrompt(x=5, y=5)] * 5}, "5 points, over this server's limit of 4"),
    ({"boxes": [pb.BoxPrompt(x_min=0, y_min=0, x_max=9, y_max=9)] * 3}, "3 boxes, over this server's limit of 2"),
    ({"points": [pb.PointPrompt(x=5, y=5, label=7)]}, "label must be 1 (foreground) or 0 (background)"),
    ({}, "no prompt"),
    ({"points": [pb.PointPrompt(x=5, y=5)], "mask_input_id": "not-an-id"}, "mask_input_id must be a logits_id"),
    ({"points": [pb.PointPrompt(x=5, y=5)], "output_format": 9}, "output_format 9"),
])
def test_bad_prompts_are_invalid_argument_and_the_server_stays_up(server, embedded, fields, message):
    with pytest.raises(grpc.RpcError) as bad:
        server.prompts.Segment(pb.SegmentRequest(image_id=embedded.image_id, **fields), timeout=30)
    assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT and message in bad.value.details()
    assert server.prompts.Segment(_click(image_id=embedded.image_id), timeout=60).results


def test_bad_images_and_ids_are_invalid_argument(server):
    for request, message in ((pb.SegmentRequest(points=[pb.PointPrompt(x=1, y=1)]), "no image in the request"),
                             (_click(image_id="xyz"), "image_id must be the 64 hex digits"),
                             (_click(image_bytes=b"not an image"), "image_bytes")):
        with pytest.raises(grpc.RpcError) as bad:
            server.prompts.Segment(request, timeout=30)
        assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT and message in bad.value.details()
    with pytest.raises(grpc.RpcError) as empty:
        server.prompts.EmbedImage(pb.EmbedImageRequest(), timeout=30)
    assert empty.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_limits_health_and_metrics_are_published(server):
    info = server.stub.GetInfo(pb.GetInfoRequest(), timeout=10)
    assert (info.limits.max_prompt_points, info.limits.max_prompt_boxes) == (4, 2)
    assert info.limits.embedding_cache_bytes == 512 * 1024 * 1024
    health = health_pb2_grpc.HealthStub(server.channel)
    status = health.Check(health_pb2.HealthCheckRequest(service="sam2serve.v1.PromptSegmentService"), timeout=10)
    assert status.status == health_pb2.HealthCheckResponse.SERVING
    registry = server.running.app.metrics.registry
    assert registry.get_sample_value("sam2serve_embedding_cache_budget_bytes") == 512 * 1024 * 1024
    assert server.metric("sam2serve_embedding_cache_bytes", "image") >= EMBEDDING_BYTES
    assert server.metric("sam2serve_embedding_cache_entries", "mask") >= 1
    for code in ("OK", "NOT_FOUND"):
        labels = {"rpc": "Segment", "code": code, "protocol": "grpc"}
        assert registry.get_sample_value("sam2serve_requests_total", labels) >= 1


def test_eviction_under_the_byte_budget_makes_old_ids_not_found(tiny_engine):
    # room for one embedding and a few mask entries (256 KiB each), not two embeddings
    budget_mb = (cached_bytes_per_image(tiny_engine) + 4 * 3 * 256 * 256 * 4) // (1024 * 1024) + 1
    s = PromptServer(ServerConfig(embedding_cache_mb=budget_mb), tiny_engine)
    try:
        first = s.prompts.EmbedImage(pb.EmbedImageRequest(image_bytes=png_bytes(seed=1)), timeout=120)
        assert s.prompts.Segment(_click(image_id=first.image_id), timeout=60).cached
        second = s.prompts.EmbedImage(pb.EmbedImageRequest(image_bytes=png_bytes(seed=2)), timeout=120)
        assert not second.cached and s.metric("sam2serve_embedding_cache_evictions_total", "image") == 1
        assert s.metric("sam2serve_embedding_cache_entries", "image") == 1
        assert s.metric("sam2serve_embedding_cache_bytes", "image") + s.metric(
            "sam2serve_embedding_cache_bytes", "mask") <= budget_mb * 1024 * 1024
        with pytest.raises(grpc.RpcError) as evicted:
            s.prompts.Segment(_click(image_id=first.image_id), timeout=60)
        assert evicted.value.code() == grpc.StatusCode.NOT_FOUND and "send the image again" in evicted.value.details()
        resent = s.prompts.Segment(_click(image_bytes=png_bytes(seed=1)), timeout=120)  # what a client does next
        assert resent.image_id == first.image_id and not resent.cached
    finally:
        s.stop()


def test_api_key_and_deadlines_apply(tiny_engine):
    s = PromptServer(ServerConfig(api_key="sesame"), tiny_engine)
    try:
        with pytest.raises(grpc.RpcError) as denied:
            s.prompts.Segment(_click(image_bytes=png_bytes()), timeout=30)
        assert denied.value.code() == grpc.StatusCode.UNAUTHENTICATED
        key = (("authorization", "Key sesame"),)
        with pytest.raises(grpc.RpcError) as late:  # an encoder run takes far longer than 1 ms
            s.prompts.EmbedImage(pb.EmbedImageRequest(image_bytes=png_bytes(seed=5)), timeout=0.001, metadata=key)
        assert late.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        ok = s.prompts.Segment(_click(image_bytes=png_bytes()), timeout=120, metadata=key)
        assert ok.results and ok.model.untrained
    finally:
        s.stop()


def test_cli_segment_with_points_and_a_box_writes_masks_metadata_and_overlay(server, tmp_path, capsys):
    from sam2serve.cli import main

    image = tmp_path / "scene.png"
    image.write_bytes(png_bytes())
    out = tmp_path / "out"
    code = main(["segment", str(image), "--server", server.address, "--out", str(out), "--point", "160,120",
                 "--point", "40,40,0", "--box", "20,20,300,220", "--single-mask", "--api-key", ""])
    assert code == 0
    assert sorted(p.name for p in (out / "masks").iterdir()) == ["mask_00_0.png"]
    overlay = cv2.imread(str(out / "overlay.png"))
    assert overlay.shape == (240, 320, 3)
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["model"]["untrained"] is True and "data" not in meta["results"][0]["masks"][0]["image"]
    printed = capsys.readouterr()
    assert "prompt set 0: 1 masks" in printed.out and "UNTRAINED" in printed.err


def test_cli_refuses_malformed_prompts():
    from sam2serve.prompt_client import parse_box, parse_point

    assert (parse_point("1,2").x, parse_point("1,2").HasField("label"), parse_point("1,2,0").label) == (1, False, 0)
    assert parse_box("1,2,3,4").y_max == 4
    for bad in ("1", "1,2,3,4", "a,b"):
        with pytest.raises(argparse.ArgumentTypeError, match="expected X,Y or X,Y,LABEL"):
            parse_point(bad)
    with pytest.raises(argparse.ArgumentTypeError, match="expected X0,Y0,X1,Y1"):
        parse_box("1,2,3")
