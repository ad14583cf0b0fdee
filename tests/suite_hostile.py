"""Hostile-input corpus over gRPC (a script with figures, not a timed test): each case is sent to a real
`sam2serve serve` process and must get its expected status code (and a message naming the problem), never
INTERNAL or UNKNOWN; after each case the server must still answer a normal call (health SERVING and GetInfo),
and at the end a real AutoSegment.

Two groups:
- default address rules (the server as deployed): images (truncated, bombs, oversized, odd formats), data
  URIs, URLs (bad schemes, loopback/private/link-local/CGNAT/metadata addresses in their many spellings),
  every numeric field out of range, NaN/inf, ids, undecodable protobuf, oversized metadata, prompt calls.
- upstream behaviour: a second server with --allow-private-urls (loopback allowed, metadata still refused)
  fetching from a local HTTP server on 127.0.0.1: redirects to metadata / other schemes / loops, HTML, a
  truncated image, 404, a body over the byte cap.

    python tests/suite_hostile.py --engines engines/sam2.1_hiera_tiny       # starts both servers
    python tests/suite_hostile.py --server 127.0.0.1:50051 [--upstream-server 127.0.0.1:50052]
"""

from __future__ import annotations

import argparse
import base64
import io
import math
import struct
import sys
import threading
import time
import zlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image

from grpc_harness import png_bytes, quick_request
from sam2serve.v1 import sam2serve_pb2 as pb
from sam2serve.v1 import sam2serve_pb2_grpc as pb_grpc
from suite_common import (
    Checks,
    ServerProcess,
    add_server_arguments,
    channel,
    code_name,
    machine,
    stub,
    table,
    wait_serving,
)

C = grpc.StatusCode
INVALID, NOT_FOUND, EXHAUSTED = C.INVALID_ARGUMENT, C.NOT_FOUND, C.RESOURCE_EXHAUSTED
PNG = png_bytes(96, 128)


# ------------------------------------------------------------------------------------------- hostile bytes

def _chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def png_header(width: int, height: int) -> bytes:
    """A PNG claiming width × height RGB pixels with almost no pixel data (a pixel bomb)."""
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + _chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + _chunk(b"IEND", b""))


def encode(image: Image.Image, fmt: str, **options: object) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **options)
    return buf.getvalue()


def bad_crc_png() -> bytes:
    data = bytearray(PNG)
    data[29] ^= 0xFF  # the IHDR chunk's CRC
    return bytes(data)


def tiff_bomb() -> bytes:
    """A TIFF whose header says 60000 × 60000 (3.6 Gpx) in a few hundred bytes."""
    data = bytearray(encode(Image.new("L", (8, 8)), "TIFF"))
    tiff = Image.open(io.BytesIO(bytes(data)))
    assert tiff.size == (8, 8)
    # rewrite ImageWidth (256) and ImageLength (257) in the first IFD (little-endian TIFF from PIL)
    ifd = struct.unpack_from("<I", data, 4)[0]
    for i in range(struct.unpack_from("<H", data, ifd)[0]):
        entry = ifd + 2 + 12 * i
        tag, kind = struct.unpack_from("<HH", data, entry)
        if tag in (256, 257):
            if kind == 3:
                struct.pack_into("<H", data, entry + 8, 60000)
            else:
                struct.pack_into("<I", data, entry + 8, 60000)
    return bytes(data)


def zero_png(width: int, height: int) -> bytes:
    """A real, complete PNG of zeros: a few KB that decode to width × height pixels (a decompression bomb)."""
    return encode(Image.new("L", (width, height)), "PNG", optimize=True)


def data_uri(data: bytes, media: str = "image/png") -> str:
    return f"data:{media};base64,{base64.b64encode(data).decode()}"


# ---------------------------------------------------------------------------------------------- the cases

@dataclass(frozen=True)
class Case:
    name: str
    call: Callable[[grpc.Channel], object]  # raises grpc.RpcError (or returns, for OK)
    code: grpc.StatusCode
    fragment: str = ""  # in the message


def auto(**fields: object) -> Callable[[grpc.Channel], object]:
    def call(ch: grpc.Channel) -> object:
        return stub(ch).AutoSegment(quick_request(**fields), timeout=120)
    return call


def bare(message: pb.AutoSegmentRequest, rpc: str = "AutoSegment") -> Callable[[grpc.Channel], object]:
    def call(ch: grpc.Channel) -> object:
        return getattr(stub(ch), rpc)(message, timeout=120)
    return call


def raw(method: str, payload: bytes, streaming: bool = False) -> Callable[[grpc.Channel], object]:
    def call(ch: grpc.Channel) -> object:
        path = f"/sam2serve.v1.AutoSegmentService/{method}"
        if streaming:
            return list(ch.unary_stream(path)(payload, timeout=30))
        return ch.unary_unary(path)(payload, timeout=30)
    return call


def id_call(rpc: str, request_id: str) -> Callable[[grpc.Channel], object]:
    def call(ch: grpc.Channel) -> object:
        s = stub(ch)
        if rpc == "WatchStatus":
            return list(s.WatchStatus(pb.StatusRequest(request_id=request_id), timeout=30))
        message = {"GetStatus": pb.StatusRequest, "GetResult": pb.ResultRequest, "Cancel": pb.CancelRequest}[rpc]
        return getattr(s, rpc)(message(request_id=request_id), timeout=30)
    return call


def submit_and_cancel(message: pb.AutoSegmentRequest) -> Callable[[grpc.Channel], object]:
    def call(ch: grpc.Channel) -> object:
        request_id = stub(ch).Submit(message, timeout=60).request_id
        return stub(ch).Cancel(pb.CancelRequest(request_id=request_id), timeout=60)
    return call


def segment(**fields: object) -> Callable[[grpc.Channel], object]:
    def call(ch: grpc.Channel) -> object:
        base: dict[str, object] = {"image_bytes": PNG}
        return pb_grpc.PromptSegmentServiceStub(ch).Segment(pb.SegmentRequest(**{**base, **fields}), timeout=120)
    return call


def big_metadata(ch: grpc.Channel) -> object:
    return stub(ch).GetInfo(pb.GetInfoRequest(), metadata=(("x-padding", "a" * 64 * 1024),), timeout=30)


def unknown_method(ch: grpc.Channel) -> object:
    return ch.unary_unary("/sam2serve.v1.AutoSegmentService/DropTables")(b"", timeout=30)


NAN, INF = math.nan, math.inf


def default_rule_cases() -> list[Case]:
    rng = np.random.default_rng(0)
    jpeg = encode(Image.fromarray(rng.integers(0, 255, (64, 64, 3), np.uint8)), "JPEG")
    over_cap = b"\x89PNG\r\n\x1a\n" + bytes(20 * 1024 * 1024)  # 20 MiB + 8 bytes: the default image cap + 8
    cases = [
        # --- images
        Case("no image", bare(pb.AutoSegmentRequest()), INVALID, "no image in the request"),
        Case("image_bytes empty", bare(pb.AutoSegmentRequest(image_bytes=b"")), INVALID, "empty"),
        Case("random bytes", auto(image_bytes=rng.bytes(4096)), INVALID, "not a supported image"),
        Case("truncated PNG", auto(image_bytes=PNG[:100]), INVALID, "PNG"),
        Case("truncated JPEG", auto(image_bytes=jpeg[: len(jpeg) // 2]), INVALID, "JPEG"),
        Case("JPEG markers only", auto(image_bytes=b"\xff\xd8\xff\xd9"), INVALID, "image_bytes"),
        Case("PNG with a bad CRC", auto(image_bytes=bad_crc_png()), INVALID, "PNG"),
        Case("PNG bomb 100k×100k header", auto(image_bytes=png_header(100_000, 100_000)), INVALID,
             "over the limit of 40,000,000 pixels"),
        Case("PNG 7000×7000 header", auto(image_bytes=png_header(7000, 7000)), INVALID, "49,000,000 pixels"),
        Case("PNG decompression bomb 8000×6000 zeros", auto(image_bytes=zero_png(8000, 6000)), INVALID,
             "48,000,000 pixels"),
        Case("TIFF bomb 60000×60000 header", auto(image_bytes=tiff_bomb()), INVALID, "pixels"),
        Case("GIF", auto(image_bytes=encode(Image.new("RGB", (8, 8)), "GIF")), INVALID, "GIF"),
        Case("animated GIF", auto(image_bytes=encode(Image.new("P", (8, 8)), "GIF", save_all=True,
                                                     append_images=[Image.new("P", (8, 8), 1)])), INVALID, "GIF"),
        Case("HTML page as image", auto(image_bytes=b"<!DOCTYPE html><html><body>hi</body></html>"), INVALID,
             "HTML"),
        Case("SVG", auto(image_bytes=b'<svg xmlns="http://www.w3.org/2000/svg" width="9e9" height="9e9"/>'),
             INVALID, "not a supported image"),
        Case("PDF", auto(image_bytes=b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<<>>\nendobj\n"), INVALID,
             "not a supported image"),
        Case("base64 text in image_bytes", auto(image_bytes=base64.b64encode(PNG)), INVALID, "base64"),
        Case("image_bytes over the 20 MiB cap", auto(image_bytes=over_cap), INVALID, "over the limit"),
        Case("Submit image over the cap", bare(quick_request(image_bytes=over_cap), "Submit"), INVALID,
             "over the limit"),
        Case("message over the receive limit (30 MiB)", auto(image_bytes=bytes(30 * 1024 * 1024)), EXHAUSTED),
        # --- data URIs
        Case("data URI with invalid base64", auto(image_data_uri="data:image/png;base64,@@@not-base64"), INVALID,
             "base64"),
        Case("data URI without a comma", auto(image_data_uri="data:image/png;base64"), INVALID, "image_data_uri"),
        Case("data URI that is an http URL", auto(image_data_uri="http://example.com/x.png"), INVALID,
             "image_data_uri"),
        Case("data URI holding HTML", auto(image_data_uri=data_uri(b"<html></html>", "text/html")), INVALID,
             "text/html"),
        Case("data URI, percent-encoded garbage", auto(image_data_uri="data:image/png,%00%01%02%ff"), INVALID,
             "image_data_uri"),
        Case("data URI empty", bare(pb.AutoSegmentRequest(image_data_uri="")), INVALID, "image_data_uri"),
        # --- URLs under the default address rules
        Case("URL ftp://", auto(image_url="ftp://example.com/x.png"), INVALID, "ftp"),
        Case("URL file:///etc/passwd", auto(image_url="file:///etc/passwd"), INVALID, "file"),
        Case("URL gopher://", auto(image_url="gopher://127.0.0.1:70/_x"), INVALID, "gopher"),
        Case("URL javascript:", auto(image_url="javascript:alert(1)"), INVALID, "image_url"),
        Case("URL not a URL", auto(image_url="not a url"), INVALID, "image_url"),
        Case("URL without a host", auto(image_url="http:///x.png"), INVALID, "image_url"),
        Case("URL loopback 127.0.0.1", auto(image_url="http://127.0.0.1:1/x.png"), INVALID, "127.0.0.1"),
        Case("URL loopback 127.1.2.3", auto(image_url="http://127.1.2.3/x.png"), INVALID, "127.1.2.3"),
        Case("URL localhost", auto(image_url="http://localhost:1/x.png"), INVALID, "image_url"),
        Case("URL IPv6 loopback [::1]", auto(image_url="http://[::1]:1/x.png"), INVALID, "::1"),
        Case("URL IPv4-mapped IPv6 [::ffff:127.0.0.1]", auto(image_url="http://[::ffff:127.0.0.1]/x"), INVALID,
             "image_url"),
        Case("URL decimal loopback 2130706433", auto(image_url="http://2130706433/x.png"), INVALID, "image_url"),
        Case("URL 0.0.0.0", auto(image_url="http://0.0.0.0:1/x.png"), INVALID, "image_url"),
        Case("URL private 10.0.0.1", auto(image_url="http://10.0.0.1/x.png"), INVALID, "10.0.0.1"),
        Case("URL private 192.168.1.1", auto(image_url="http://192.168.1.1/x.png"), INVALID, "192.168.1.1"),
        Case("URL private 172.16.0.1", auto(image_url="http://172.16.0.1/x.png"), INVALID, "172.16.0.1"),
        Case("URL CGNAT 100.64.0.1", auto(image_url="http://100.64.0.1/x.png"), INVALID, "100.64.0.1"),
        Case("URL link-local 169.254.1.1", auto(image_url="http://169.254.1.1/x.png"), INVALID, "169.254.1.1"),
        Case("URL metadata 169.254.169.254", auto(image_url="http://169.254.169.254/latest/meta-data/"), INVALID,
             "169.254.169.254"),
        Case("URL metadata.google.internal", auto(image_url="http://metadata.google.internal/computeMetadata/v1/"),
             INVALID, "metadata"),
        Case("URL AWS IPv6 metadata [fd00:ec2::254]", auto(image_url="http://[fd00:ec2::254]/latest/"), INVALID,
             "fd00:ec2::254"),
        Case("URL userinfo to loopback", auto(image_url="http://user:pw@127.0.0.1:1/x.png"), INVALID,
             "user name or password"),
        Case("URL of 100 KB", auto(image_url="http://127.0.0.1/" + "a" * 100_000), INVALID, "image_url"),
        # --- every numeric field out of range, NaN, inf
        Case("points_per_side 0", auto(points_per_side=0), INVALID, "points_per_side must be between 1 and 64"),
        Case("points_per_side 65", auto(points_per_side=65), INVALID, "points_per_side must be between 1 and 64"),
        Case("points_per_side -2147483648", auto(points_per_side=-(2**31)), INVALID, "points_per_side"),
        Case("pred_iou_thresh NaN", auto(pred_iou_thresh=NAN), INVALID, "pred_iou_thresh must be a finite number"),
        Case("pred_iou_thresh 1.5", auto(pred_iou_thresh=1.5), INVALID, "pred_iou_thresh must be between"),
        Case("stability_score_thresh -inf", auto(stability_score_thresh=-INF), INVALID, "finite"),
        Case("stability_score_thresh 1.01", auto(stability_score_thresh=1.01), INVALID, "stability_score_thresh"),
        Case("min_mask_region_area -1", auto(min_mask_region_area=-1), INVALID, "min_mask_region_area"),
        Case("min_mask_region_area 2^31-1", auto(min_mask_region_area=2**31 - 1), INVALID, "min_mask_region_area"),
        Case("points_per_batch 0", auto(points_per_batch=0), INVALID, "points_per_batch"),
        Case("points_per_batch 2^31-1", auto(points_per_batch=2**31 - 1), INVALID, "points_per_batch"),
        Case("box_nms_thresh NaN", auto(box_nms_thresh=NAN), INVALID, "box_nms_thresh"),
        Case("box_nms_thresh 2", auto(box_nms_thresh=2.0), INVALID, "box_nms_thresh"),
        Case("crop_n_layers 9", auto(crop_n_layers=9), INVALID, "crop_n_layers"),
        Case("crop_n_layers -1", auto(crop_n_layers=-1), INVALID, "crop_n_layers"),
        Case("crop_nms_thresh inf", auto(crop_nms_thresh=INF), INVALID, "crop_nms_thresh"),
        Case("crop_overlap_ratio 1.0", auto(crop_overlap_ratio=1.0), INVALID, "crop_overlap_ratio"),
        Case("crop_n_points_downscale_factor 0", auto(crop_n_points_downscale_factor=0), INVALID,
             "crop_n_points_downscale_factor"),
        Case("crop_n_points_downscale_factor 17", auto(crop_n_points_downscale_factor=17), INVALID,
             "crop_n_points_downscale_factor"),
        Case("stability_score_offset inf", auto(stability_score_offset=INF), INVALID, "stability_score_offset"),
        Case("stability_score_offset -1", auto(stability_score_offset=-1.0), INVALID, "stability_score_offset"),
        Case("mask_threshold NaN", auto(mask_threshold=NAN), INVALID, "mask_threshold"),
        Case("mask_threshold 1e30", auto(mask_threshold=1e30), INVALID, "mask_threshold"),
        Case("output_min_region_area -1", auto(output_min_region_area=-1), INVALID, "output_min_region_area"),
        Case("max_masks -2", auto(max_masks=-2), INVALID, "max_masks"),
        Case("output_format 99 (unknown enum)", auto(output_format=99), INVALID, "output_format"),
        Case("a crop layer without points (was INTERNAL)",
             auto(points_per_side=1, crop_n_layers=1, crop_n_points_downscale_factor=2), INVALID, "no points"),
        Case("work over the decoder-prompt cap", auto(points_per_side=64, crop_n_layers=3, use_m2m=True), INVALID,
             "decoder prompts"),
        Case("webhook_url file://", auto(webhook_url="file:///etc/passwd"), INVALID, "webhook_url"),
        # image_url's address rules, at Submit (before: accepted, and refused only in the log when sent)
        Case("webhook_url to metadata: refused at Submit", submit_and_cancel(
            quick_request(webhook_url="http://169.254.169.254/hook")), INVALID, "cloud metadata address"),
        # --- ids
        Case("GetStatus empty id", id_call("GetStatus", ""), NOT_FOUND),
        Case("GetStatus 100 KB id", id_call("GetStatus", "x" * 100_000), NOT_FOUND),
        Case("GetResult unknown id", id_call("GetResult", "0" * 32), NOT_FOUND),
        Case("Cancel id with control bytes", id_call("Cancel", "\x00\x1b[2J\u202e"), NOT_FOUND),
        Case("WatchStatus 100 KB id", id_call("WatchStatus", "x" * 100_000), NOT_FOUND),
        Case("GetResult path traversal id", id_call("GetResult", "../../etc/passwd"), NOT_FOUND),
        # --- the wire
        Case("undecodable protobuf: AutoSegment", raw("AutoSegment", b"\xff\xff\xff\xff\x0f"), INVALID,
             "not a valid sam2serve.v1.AutoSegmentRequest"),
        Case("undecodable protobuf: Submit", raw("Submit", b"\x0a\xff\xff\xff\xff\x7f"), INVALID,
             "not a valid sam2serve.v1.AutoSegmentRequest"),
        Case("undecodable protobuf: WatchStatus", raw("WatchStatus", b"\x12\x05ab", streaming=True), INVALID,
             "not a valid sam2serve.v1.StatusRequest"),
        Case("a field in the wrong wire type (kept as an unknown field)", raw("GetStatus", b"\x0d\x00\x00\x00\x00"),
             NOT_FOUND, "request ids are 32 hexadecimal characters"),
        Case("64 KB of metadata", big_metadata, EXHAUSTED),
        Case("unknown method", unknown_method, C.UNIMPLEMENTED),
        # --- prompt service
        Case("Segment point NaN", segment(points=[pb.PointPrompt(x=NAN, y=1)]), INVALID, "finite"),
        Case("Segment point off the image", segment(points=[pb.PointPrompt(x=1e6, y=1)]), INVALID, "x"),
        Case("Segment inverted box", segment(boxes=[pb.BoxPrompt(x_min=10, y_min=10, x_max=5, y_max=20)]), INVALID,
             "x_min"),
        Case("Segment 65 points", segment(points=[pb.PointPrompt(x=1, y=1)] * 65), INVALID, "64"),
        Case("Segment label 7", segment(points=[pb.PointPrompt(x=1, y=1, label=7)]), INVALID, "label"),
        Case("Segment unknown image_id", segment(image_bytes=None, image_id="f" * 64,
                                                 points=[pb.PointPrompt(x=1, y=1)]), NOT_FOUND, "image"),
    ]
    return cases


# --------------------------------------------------------------------------------- upstream (HTTP) cases

class Upstream(BaseHTTPRequestHandler):
    """What a hostile image host does."""

    def do_GET(self) -> None:
        port = self.server.server_address[1]
        routes: dict[str, tuple[int, dict[str, str], bytes]] = {
            "/png": (200, {"Content-Type": "image/png"}, PNG),
            "/to-metadata": (302, {"Location": "http://169.254.169.254/latest/meta-data/"}, b""),
            "/to-metadata-name": (302, {"Location": "http://metadata.google.internal/"}, b""),
            "/to-file": (302, {"Location": "file:///etc/passwd"}, b""),
            "/to-gopher": (301, {"Location": "gopher://127.0.0.1/"}, b""),
            "/loop": (302, {"Location": f"http://127.0.0.1:{port}/loop"}, b""),
            "/html": (200, {"Content-Type": "text/html"}, b"<!DOCTYPE html><html>login</html>"),
            "/truncated": (200, {"Content-Type": "image/png"}, PNG[:120]),
            "/missing": (404, {"Content-Type": "text/plain"}, b"no"),
            "/error": (500, {"Content-Type": "text/plain"}, b"boom"),
            "/empty": (200, {"Content-Type": "image/png"}, b""),
        }
        if self.path == "/huge":  # over the 20 MiB cap, streamed without a length
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.end_headers()
            chunk = bytes(1 << 20)
            try:
                for _ in range(24):
                    self.wfile.write(chunk)
            except (BrokenPipeError, ConnectionResetError):
                pass
            return
        status, headers, body = routes.get(self.path, (404, {}, b""))
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


def upstream_cases(port: int) -> list[Case]:
    base = f"http://127.0.0.1:{port}"
    return [
        Case("redirect to 169.254.169.254", auto(image_url=f"{base}/to-metadata"), INVALID, "169.254.169.254"),
        Case("redirect to metadata.google.internal", auto(image_url=f"{base}/to-metadata-name"), INVALID,
             "metadata"),
        Case("redirect to file://", auto(image_url=f"{base}/to-file"), INVALID, "file"),
        Case("redirect to gopher://", auto(image_url=f"{base}/to-gopher"), INVALID, "gopher"),
        Case("redirect loop", auto(image_url=f"{base}/loop"), INVALID, "redirect"),
        Case("HTML page at the URL", auto(image_url=f"{base}/html"), INVALID, "HTML"),
        Case("truncated image at the URL", auto(image_url=f"{base}/truncated"), INVALID, "PNG"),
        Case("404 at the URL", auto(image_url=f"{base}/missing"), INVALID, "404"),
        Case("500 at the URL", auto(image_url=f"{base}/error"), INVALID, "500"),
        Case("empty body at the URL", auto(image_url=f"{base}/empty"), INVALID, "empty"),
        Case("24 MiB body without a length", auto(image_url=f"{base}/huge"), INVALID, "limit"),
    ]


# ------------------------------------------------------------------------------------------------ running

def run_case(ch: grpc.Channel, case: Case) -> tuple[str, str, float]:
    t0 = time.perf_counter()
    try:
        case.call(ch)
        return "OK", "", time.perf_counter() - t0
    except grpc.RpcError as e:
        return code_name(e), e.details() or "", time.perf_counter() - t0  # type: ignore[attr-defined]


def still_serving(ch: grpc.Channel) -> bool:
    try:
        health = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10)
        return bool(health.status == health_pb2.HealthCheckResponse.SERVING
                    and stub(ch).GetInfo(pb.GetInfoRequest(), timeout=10).model.name)
    except grpc.RpcError:
        return False


def run_group(address: str, cases: list[Case], checks: Checks, rows: list[tuple[object, ...]],
              group: str) -> None:
    with channel(address) as ch:
        for case in cases:
            got, details, seconds = run_case(ch, case)
            ok = got == case.code.name and case.fragment in details
            serving = still_serving(ch)
            rows.append((len(rows) + 1, group, case.name, case.code.name, got, "yes" if ok else "NO",
                         "yes" if serving else "NO", seconds * 1000, details[:90]))
            checks.check(got not in ("INTERNAL", "UNKNOWN"), f"{case.name}: {got} {details[:200]!r}")
            checks.check(ok, f"{case.name}: expected {case.code.name} with {case.fragment!r}, got {got} "
                              f"{details[:200]!r}")
            checks.check(serving, f"{case.name}: the server stopped answering afterwards")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_server_arguments(parser)
    parser.add_argument("--upstream-server", default="",
                        help="HOST:PORT of a running server with --allow-private-urls (the upstream group)")
    parser.add_argument("--no-upstream", action="store_true", help="skip the upstream group")
    args = parser.parse_args(argv)
    checks = Checks()
    rows: list[tuple[object, ...]] = []
    servers: list[ServerProcess] = []
    http = ThreadingHTTPServer(("127.0.0.1", 0), Upstream)
    threading.Thread(target=http.serve_forever, daemon=True).start()
    try:
        address = args.server
        if not address:
            servers.append(ServerProcess(args.engines, "--workers", "1"))
            address = servers[-1].address
        wait_serving(address)
        run_group(address, default_rule_cases(), checks, rows, "default rules")
        with channel(address) as ch:  # a normal request after the whole corpus
            result = stub(ch).AutoSegment(quick_request(points_per_side=1), timeout=600)
            checks.check(result.total_masks >= 1, "the normal AutoSegment after the corpus returned no mask")
        if not args.no_upstream:
            upstream = args.upstream_server
            if not upstream:
                servers.append(ServerProcess(args.engines, "--workers", "1", "--allow-private-urls"))
                upstream = servers[-1].address
            wait_serving(upstream)
            run_group(upstream, upstream_cases(http.server_address[1]), checks, rows, "upstream")
            with channel(upstream) as ch:  # loopback is allowed there: a good image by URL works
                result = stub(ch).AutoSegment(quick_request(
                    image_url=f"http://127.0.0.1:{http.server_address[1]}/png", points_per_side=1), timeout=600)
                checks.check(result.total_masks >= 1, "the good URL after the upstream cases returned no mask")
    finally:
        http.shutdown()
        for server in servers:
            rc = server.terminate()
            checks.check(rc == 0, f"server exit code {rc}")
            server.kill()

    codes = Counter(str(r[4]) for r in rows)
    print(f"\n### Hostile corpus over gRPC: {len(rows)} cases\n")
    print(table(("#", "group", "case", "expected", "got", "as expected", "serving after", "ms", "message"), rows))
    print(f"\ncodes: {', '.join(f'{k} {v}' for k, v in sorted(codes.items()))}; "
          f"as expected {sum(r[5] == 'yes' for r in rows)}/{len(rows)}")
    print(f"machine: {machine()}")
    checks.check(len(rows) >= 40, f"only {len(rows)} cases")
    return checks.exit_code()


if __name__ == "__main__":
    sys.exit(main())
