"""The hostile-input layer: image_url / image_data_uri / image_bytes → RGB, or a domain error that says why.

Self-contained and fast: images are made here with PIL/numpy, fetches go to a local HTTP server on
127.0.0.1, and addresses that must be refused are checked by the classifier (or refused before any
connection, with connecting made to fail the test) — no traffic leaves loopback.
"""

from __future__ import annotations

import base64
import io
import shutil
import socket
import ssl
import struct
import subprocess
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from ipaddress import ip_address
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sam2serve import outbound as fetch_module
from sam2serve.errors import ImageFetchError, ImageTooLarge, InvalidInput
from sam2serve.inputs import (
    InputLimits,
    LoadedImage,
    address_refusal,
    blocked_reason,
    decode_image,
    fetch_url,
    load_image,
    parse_data_uri,
)

LIMITS = InputLimits()
LOCAL = InputLimits(allow_hosts=("127.0.0.1",))


# ------------------------------------------------------------------------------------------------ helpers

def gradient(width: int = 24, height: int = 16) -> np.ndarray:
    y, x = np.mgrid[0:height, 0:width]
    return np.stack([x * 255 // (width - 1), y * 255 // (height - 1), (x + y) % 256], -1).astype(np.uint8)


def encode(image: Image.Image, fmt: str, **options: object) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **options)
    return buf.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width × height 8-bit RGB pixels, followed by a few bytes of pixel data."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
            + chunk(b"IEND", b""))


def data_uri(data: bytes, media_type: str = "image/png") -> str:
    return f"data:{media_type};base64,{base64.b64encode(data).decode('ascii')}"


def raises(exc_class: type[Exception], fragment: str, fn: Callable[..., object], *args: object) -> str:
    """Run fn(*args), assert it raises exactly exc_class with `fragment` in its message; return the message."""
    with pytest.raises(exc_class) as info:
        fn(*args)
    assert type(info.value) is exc_class, f"{type(info.value).__name__}: {info.value}"
    message = str(info.value)
    assert fragment in message, message
    return message


PNG = encode(Image.fromarray(gradient()), "PNG")


# ----------------------------------------------------------------------------------------------- decoding

@pytest.mark.parametrize(("fmt", "options", "exact"), [
    ("PNG", {}, True),
    ("JPEG", {"quality": 95}, False),
    ("WEBP", {"lossless": True}, True),
    ("BMP", {}, True),
    ("TIFF", {}, True),
])
def test_supported_formats_decode_to_rgb(fmt, options, exact):
    rgb = gradient()
    data = encode(Image.fromarray(rgb), fmt, **options)
    loaded = load_image("bytes", data, LIMITS)
    assert isinstance(loaded, LoadedImage)
    assert (loaded.format, loaded.width, loaded.height, loaded.byte_count) == (fmt, 24, 16, len(data))
    assert loaded.source_kind == "bytes"
    assert loaded.rgb.shape == (16, 24, 3) and loaded.rgb.dtype == np.uint8 and loaded.rgb.flags.c_contiguous
    diff = np.abs(loaded.rgb.astype(int) - rgb.astype(int))
    assert diff.max() == 0 if exact else diff.mean() < 6


def test_exif_orientation_is_applied():
    stored = np.zeros((20, 30, 3), np.uint8)  # 30 wide, 20 high: left half red, right half blue
    stored[:, :15] = (255, 0, 0)
    stored[:, 15:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6  # display = stored rotated 90° clockwise: the left (red) half goes to the top
    data = encode(Image.fromarray(stored), "JPEG", quality=95, exif=exif.tobytes())
    loaded = load_image("bytes", data, LIMITS)
    assert (loaded.width, loaded.height) == (20, 30)
    top, bottom = loaded.rgb[2, 10].astype(int), loaded.rgb[-3, 10].astype(int)
    assert top[0] > 200 and top[2] < 60, top
    assert bottom[2] > 200 and bottom[0] < 60, bottom


def test_modes_are_normalised_to_8bit_rgb():
    rgba = Image.new("RGBA", (4, 3), (10, 20, 30, 0))  # fully transparent: alpha is dropped, colour kept
    assert decode_image(encode(rgba, "PNG"), LIMITS, "image_bytes")[0, 0].tolist() == [10, 20, 30]

    la = Image.new("LA", (4, 3), (77, 128))
    assert decode_image(encode(la, "PNG"), LIMITS, "image_bytes")[1, 1].tolist() == [77, 77, 77]

    pal = Image.new("P", (4, 3), 1)
    pal.putpalette([0, 0, 0, 200, 100, 50] + [0] * 762)
    pal.info["transparency"] = 1
    data = encode(pal, "PNG", transparency=1)
    assert Image.open(io.BytesIO(data)).mode == "P"
    assert decode_image(data, LIMITS, "image_bytes")[2, 3].tolist() == [200, 100, 50]

    cmyk = Image.new("CMYK", (4, 3), (255, 0, 0, 0))  # pure cyan ink
    assert decode_image(encode(cmyk, "TIFF"), LIMITS, "image_bytes")[0, 0].tolist() == [0, 255, 255]

    deep = Image.fromarray(np.full((3, 4), 0x1234, np.uint16))
    data = encode(deep, "PNG")
    assert Image.open(io.BytesIO(data)).mode.startswith("I")
    assert decode_image(data, LIMITS, "image_bytes")[0, 0].tolist() == [0x12, 0x12, 0x12]

    bilevel = Image.new("1", (4, 3), 1)
    assert decode_image(encode(bilevel, "PNG"), LIMITS, "image_bytes")[0, 0].tolist() == [255, 255, 255]


def test_multi_frame_tiff_gives_the_first_frame():
    frames = [Image.new("RGB", (5, 4), colour) for colour in ((1, 2, 3), (200, 200, 200))]
    data = encode(frames[0], "TIFF", save_all=True, append_images=frames[1:])
    assert decode_image(data, LIMITS, "image_bytes")[0, 0].tolist() == [1, 2, 3]


def test_pixel_bomb_is_refused_from_the_header():
    # The files hold almost no pixel data: had the decoder tried to load them it would have failed with
    # "truncated", after allocating 30 GB (100k × 100k) or 147 MB (7000 × 7000).
    raises(ImageTooLarge, "10,000,000,000 pixels, over the limit of 40,000,000 pixels",
           decode_image, png_header_only(100_000, 100_000), LIMITS, "image_bytes")
    raises(ImageTooLarge, "image_bytes is 7000×7000 = 49,000,000 pixels, over the limit",
           decode_image, png_header_only(7000, 7000), LIMITS, "image_bytes")
    raises(ImageTooLarge, "24×16 = 384 pixels, over the limit of 100 pixels",
           load_image, "bytes", PNG, InputLimits(max_pixels=100))


def test_small_file_with_many_pixels_is_refused():
    data = encode(Image.new("L", (3000, 2000)), "PNG")  # 6 Mpx of zeros: a few KB
    assert len(data) < 50_000
    raises(ImageTooLarge, "3000×2000 = 6,000,000 pixels", load_image, "image_bytes", data,
           InputLimits(max_pixels=5_000_000))


def test_damaged_and_unsupported_bytes_are_invalid_input():
    jpeg = encode(Image.fromarray(gradient(64, 64)), "JPEG")
    raises(InvalidInput, "image_bytes is a damaged or truncated JPEG file", decode_image,
           jpeg[: len(jpeg) // 2], LIMITS, "image_bytes")
    raises(InvalidInput, "damaged or truncated PNG", decode_image, PNG[:40], LIMITS, "image_bytes")
    rng = np.random.default_rng(0)
    raises(InvalidInput, "image_bytes is not a supported image (got unrecognised data starting with",
           load_image, "bytes", rng.bytes(1000), LIMITS)
    message = raises(InvalidInput, "(got a GIF image); send JPEG, PNG, WebP, BMP or TIFF",
                     load_image, "bytes", encode(Image.new("RGB", (4, 4)), "GIF"), LIMITS)
    assert message.startswith("image_bytes is not a supported image")
    raises(InvalidInput, "got base64 text", load_image, "bytes", base64.b64encode(PNG), LIMITS)
    raises(InvalidInput, "got an HTML page", load_image, "bytes", b"<!DOCTYPE html><html></html>", LIMITS)
    raises(InvalidInput, "image_bytes is empty", load_image, "bytes", b"", LIMITS)
    raises(ImageTooLarge, "image_bytes is 1.2 KiB, over the limit of 1000 bytes",
           load_image, "bytes", b"\x89PNG" + b"\x00" * 1200, InputLimits(max_image_bytes=1000))
    raises(InvalidInput, "no image in the request", load_image, None, b"", LIMITS)


# ---------------------------------------------------------------------------------------------- data URIs

def test_data_uri_good():
    loaded = load_image("data_uri", data_uri(PNG), LIMITS)
    assert (loaded.source_kind, loaded.format, loaded.byte_count) == ("data_uri", "PNG", len(PNG))
    assert np.array_equal(loaded.rgb, gradient())
    # The media type is not trusted (the decoder sniffs); parameters and an empty type are allowed.
    assert parse_data_uri(data_uri(PNG, "image/jpeg;name=x.png"), 10**6) == PNG
    assert parse_data_uri("DATA:;base64," + base64.b64encode(PNG).decode(), 10**6) == PNG


def test_data_uri_errors():
    raises(InvalidInput, "image_data_uri must be base64-encoded", parse_data_uri, "data:image/png,%89PNG", 10**6)
    raises(InvalidInput, "image_data_uri is not valid base64: ", parse_data_uri, "data:image/png;base64,ab$d", 99)
    raises(InvalidInput, "remove line breaks", parse_data_uri, "data:image/png;base64,aGVs\nbG8=", 99)
    raises(InvalidInput, "URL-safe base64", parse_data_uri, "data:image/png;base64,ab-_", 99)
    raises(InvalidInput, "is not valid base64", parse_data_uri, "data:image/png;base64,aGVsbG8", 99)  # padding
    raises(InvalidInput, "image_data_uri must start with 'data:'", parse_data_uri, "image/png;base64,AAAA", 99)
    raises(InvalidInput, "must start with 'data:'", load_image, "image_data_uri", "http://example.com/a.png", LIMITS)
    raises(InvalidInput, "image_data_uri has no ','", parse_data_uri, "data:image/png;base64", 99)
    raises(InvalidInput, "media type 'text/plain'; expected an image/* type",
           parse_data_uri, data_uri(PNG, "text/plain"), 10**6)
    raises(InvalidInput, "malformed media type", parse_data_uri, "data:image;base64,AAAA", 99)
    raises(InvalidInput, "image_data_uri has no data", parse_data_uri, "data:image/png;base64,", 99)
    # Too big: refused from the length alone, before the (here invalid) base64 is looked at.
    raises(ImageTooLarge, "image_data_uri holds about 750 bytes, over the limit of 100 bytes",
           parse_data_uri, "data:image/png;base64," + "$" * 1000, 100)
    raises(ImageTooLarge, "over the limit", load_image, "data_uri", data_uri(PNG),
           InputLimits(max_image_bytes=len(PNG) - 1))
    assert len(parse_data_uri(data_uri(PNG), len(PNG))) == len(PNG)  # exactly at the limit is fine
    # Decodes, but is not an image.
    raises(InvalidInput, "image_data_uri is not a supported image", load_image, "data_uri",
           data_uri(b"hello world"), LIMITS)


# ---------------------------------------------------------------------------------------- address policy

@pytest.mark.parametrize(("address", "reason"), [
    ("127.0.0.1", "loopback"),
    ("127.3.4.5", "loopback"),
    ("::1", "loopback"),
    ("10.0.0.1", "private"),
    ("172.16.5.4", "private"),
    ("192.168.1.1", "private"),
    ("fc00::1", "private"),
    ("169.254.169.254", "cloud metadata"),
    ("fd00:ec2::254", "cloud metadata"),
    ("169.254.1.1", "link-local"),
    ("fe80::1", "link-local"),
    ("100.64.0.1", "carrier-grade NAT"),
    ("100.127.255.254", "carrier-grade NAT"),
    ("0.0.0.0", "unspecified"),
    ("::", "unspecified"),
    ("224.0.0.1", "multicast"),
    ("ff02::1", "multicast"),
    ("240.0.0.1", "reserved"),
    ("255.255.255.255", "reserved"),
    ("192.0.2.1", "private"),  # TEST-NET-1
    ("::ffff:127.0.0.1", "loopback address (as IPv4 127.0.0.1 inside IPv6)"),
    ("::ffff:10.0.0.1", "private"),
    ("::ffff:169.254.169.254", "cloud metadata"),
    ("2002:7f00:1::", "loopback"),  # 6to4 of 127.0.0.1
    ("64:ff9b::a00:1", "private"),  # NAT64 of 10.0.0.1
    ("::127.0.0.1", "reserved"),  # IPv4-compatible (deprecated)
    ("fec0::1", "site-local"),
])
def test_non_public_addresses_are_blocked(address, reason):
    found = blocked_reason(address)
    assert found is not None and reason in found, found
    assert address_refusal("example.com", ip_address(address), LIMITS) is not None


@pytest.mark.parametrize("address", ["8.8.8.8", "1.1.1.1", "93.184.216.34", "2606:4700:4700::1111",
                                     "::ffff:8.8.8.8", "64:ff9b::808:808"])
def test_public_addresses_are_allowed(address):
    assert blocked_reason(address) is None
    assert address_refusal("example.com", ip_address(address), LIMITS) is None


def test_allow_lists():
    private = ip_address("10.1.2.3")
    assert address_refusal("svc", private, InputLimits(allow_hosts=("10.0.0.0/8",))) is None
    assert address_refusal("Images.Internal.", private, InputLimits(allow_hosts=("images.internal",))) is None
    assert address_refusal("other.internal", private, InputLimits(allow_hosts=("images.internal",))) is not None
    assert address_refusal("h", ip_address("::ffff:10.1.2.3"), InputLimits(allow_hosts=("10.0.0.0/8",))) is None
    assert address_refusal("h", ip_address("::1"), InputLimits(allow_hosts=("[::1]",))) is None
    opened = InputLimits(allow_private_networks=True)
    assert address_refusal("svc", private, opened) is None
    assert address_refusal("svc", ip_address("127.0.0.1"), opened) is None
    assert "metadata" in address_refusal("svc", ip_address("169.254.169.254"), opened)  # still blocked
    named = InputLimits(allow_hosts=("169.254.169.254",))
    assert address_refusal("169.254.169.254", ip_address("169.254.169.254"), named) is None


# ----------------------------------------------------------------------------------------------- fetching

class Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: object, client_address: object) -> None:
        pass  # clients that give up (timeouts, size caps) break pipes; that is the point of those tests


@pytest.fixture(scope="module")
def server() -> Iterator[dict]:
    state: dict = {"requests": []}

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:
            pass

        def send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None,
                 length: bool = True) -> None:
            self.send_response(status)
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            if length:
                self.send_header("Content-Length", str(len(body)))
            else:
                self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(body)
            self.wfile.flush()

        def do_GET(self) -> None:
            state["requests"].append({"path": self.path, "headers": dict(self.headers.items())})
            path, port = self.path, self.server.server_address[1]
            if path in ("/img.png", "/echo"):
                self.send(200, PNG, {"Content-Type": "text/plain"})  # a lying type: the bytes decide
            elif path.startswith("/redirect/"):
                n = int(path.rsplit("/", 1)[1])
                self.send(302, headers={"Location": f"/redirect/{n - 1}" if n > 1 else "../img.png"})
            elif path == "/to-loopback-ip":
                self.send(302, headers={"Location": f"http://127.0.0.1:{port}/img.png"})
            elif path == "/to-ftp":
                self.send(301, headers={"Location": "ftp://127.0.0.1/img.png"})
            elif path == "/set-cookie":
                self.send(302, headers={"Location": "/echo", "Set-Cookie": "session=secret; Path=/"})
            elif path == "/big-declared":
                self.send(200, b"\x89PNG" + b"\x00" * 9996)
            elif path == "/big-stream":
                self.send(200, b"\x89PNG" + b"\x00" * 5000, length=False)
            elif path == "/big-chunked":
                self.send_response(200)
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                for _ in range(10):
                    self.wfile.write(b"200\r\n" + b"\x00" * 0x200 + b"\r\n")
                self.wfile.write(b"0\r\n\r\n")
            elif path == "/short":
                self.send_response(200)
                self.send_header("Content-Length", "1000")
                self.end_headers()
                self.wfile.write(PNG[:10])
                self.close_connection = True
            elif path == "/slow":
                time.sleep(1.5)
                self.send(200, PNG)
            elif path == "/drip-body":
                self.send_response(200)
                self.send_header("Content-Length", "100")
                self.end_headers()
                for _ in range(30):
                    self.wfile.write(b"\x00")
                    self.wfile.flush()
                    time.sleep(0.1)
            elif path == "/drip-headers":
                self.wfile.write(b"HTTP/1.1 200 OK\r\n")
                for _ in range(30):
                    self.wfile.write(b"X")
                    self.wfile.flush()
                    time.sleep(0.1)
            elif path == "/teapot":
                self.send(418, b"short and stout")
            else:
                self.send(404, b"not here")

    httpd = Server(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    state["port"] = httpd.server_address[1]
    state["base"] = f"http://127.0.0.1:{state['port']}"
    yield state
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def no_connections(monkeypatch):
    """Make any outgoing connection fail the test: refusals must happen before connecting."""

    def forbidden(sock, address, *args, **kwargs):
        raise AssertionError(f"connected to {address}")

    monkeypatch.setattr(socket.socket, "connect", forbidden)
    monkeypatch.setattr(socket.socket, "connect_ex", forbidden)


@pytest.fixture
def fake_dns(monkeypatch, server):
    """Names in `table` resolve (once each, counted) to the given addresses; others fail to resolve."""
    table: dict[str, list[str]] = {"images.test": ["127.0.0.1"], "other.test": ["127.0.0.1"],
                                   "rebind.test": ["127.0.0.1"]}
    calls: list[str] = []

    def getaddrinfo(host, port, *args, **kwargs):
        calls.append(host)
        if host not in table:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        if host == "rebind.test" and calls.count(host) > 1:  # a rebinding DNS answers differently later
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("10.0.0.1", port))]
        return [(socket.AF_INET6 if ":" in a else socket.AF_INET, socket.SOCK_STREAM, 6, "",
                 (a, port, 0, 0) if ":" in a else (a, port)) for a in table[host]]

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    return table, calls


def test_fetch_good(server):
    loaded = load_image("url", server["base"] + "/img.png", LOCAL)
    assert (loaded.source_kind, loaded.format, loaded.byte_count) == ("url", "PNG", len(PNG))
    assert np.array_equal(loaded.rgb, gradient())
    headers = server["requests"][-1]["headers"]
    assert headers["Host"] == f"127.0.0.1:{server['port']}" and headers["Accept-Encoding"] == "identity"
    assert not {"Authorization", "Cookie", "Referer"} & set(headers)


def test_fetch_connects_to_the_checked_address_with_the_right_host_header(server, fake_dns):
    _, calls = fake_dns
    url = f"http://rebind.test:{server['port']}/img.png"
    assert fetch_url(url, InputLimits(allow_hosts=("rebind.test",))) == PNG
    assert calls == ["rebind.test"]  # one lookup: the rebinding second answer (10.0.0.1) is never asked for
    assert server["requests"][-1]["headers"]["Host"] == f"rebind.test:{server['port']}"


def test_fetch_http_errors(server):
    raises(ImageFetchError, "image_url returned HTTP 404 Not Found", fetch_url, server["base"] + "/nothing", LOCAL)
    raises(ImageFetchError, "returned HTTP 418 I'm a Teapot", fetch_url, server["base"] + "/teapot", LOCAL)
    raises(ImageFetchError, "the connection closed after 10 of 1,000 bytes",
           fetch_url, server["base"] + "/short", LOCAL)


def test_fetch_follows_redirects_up_to_the_limit(server):
    assert fetch_url(server["base"] + "/redirect/3", LOCAL) == PNG
    raises(ImageFetchError, "image_url redirected more than 3 times", fetch_url, server["base"] + "/redirect/4", LOCAL)
    raises(ImageFetchError, "redirected more than 0 times", fetch_url, server["base"] + "/redirect/1",
           InputLimits(allow_hosts=("127.0.0.1",), max_redirects=0))


def test_redirects_are_rechecked(server, fake_dns):
    only_name = InputLimits(allow_hosts=("images.test",))
    message = raises(ImageFetchError, "points at 127.0.0.1, a loopback address; only public addresses",
                     fetch_url, f"http://images.test:{server['port']}/to-loopback-ip", only_name)
    assert message.startswith("image_url (redirected to 'http://127.0.0.1:")
    raises(ImageFetchError, "uses the 'ftp' scheme; only http and https", fetch_url,
           server["base"] + "/to-ftp", LOCAL)


def test_cookies_are_not_kept(server):
    assert fetch_url(server["base"] + "/set-cookie", LOCAL) == PNG
    assert server["requests"][-1]["path"] == "/echo" and "Cookie" not in server["requests"][-1]["headers"]


@pytest.mark.usefixtures("no_connections")
@pytest.mark.parametrize(("url", "fragment"), [
    ("http://127.0.0.1:1/img.png", "points at 127.0.0.1, a loopback address"),
    ("http://[::1]/img.png", "points at ::1, a loopback address"),
    ("http://10.0.0.1/img.png", "points at 10.0.0.1, a private address"),
    ("http://169.254.169.254/latest/meta-data/", "a cloud metadata address"),
    ("http://100.64.0.1/", "carrier-grade NAT"),
    ("http://[::ffff:127.0.0.1]/", "loopback"),
    ("http://0.0.0.0:8080/", "the unspecified address"),
    ("http://metadata.google.internal/computeMetadata/v1/", "host 'metadata.google.internal' is a cloud metadata"),
    ("https://METADATA.google.internal./", "cloud metadata endpoint"),
])
def test_blocked_addresses_are_refused_before_connecting(url, fragment):
    raises(ImageFetchError, fragment, fetch_url, url, LIMITS)


@pytest.mark.usefixtures("no_connections")
def test_names_resolving_to_blocked_addresses_are_refused(fake_dns):
    table, _ = fake_dns
    table["evil.test"] = ["169.254.169.254"]
    table["mixed.test"] = ["93.184.216.34", "10.0.0.1"]
    table["v6.test"] = ["::ffff:10.0.0.1"]
    message = raises(ImageFetchError, "host 'evil.test' resolves to a cloud metadata address",
                     fetch_url, "http://evil.test/x.png", LIMITS)
    assert "169.254" not in message  # resolved addresses are not revealed
    raises(ImageFetchError, "host 'mixed.test' resolves to a private address", fetch_url, "http://mixed.test/", LIMITS)
    raises(ImageFetchError, "resolves to a private address", fetch_url, "https://v6.test/", LIMITS)
    raises(ImageFetchError, "host 'images.test' resolves to a loopback address", fetch_url,
           "http://images.test/", LIMITS)  # the default: loopback blocked
    raises(ImageFetchError, "host 'nx.test' could not be resolved", fetch_url, "http://nx.test/", LIMITS)


@pytest.mark.usefixtures("no_connections")
@pytest.mark.parametrize(("url", "fragment"), [
    ("ftp://example.com/a.png", "image_url uses the 'ftp' scheme; only http and https are allowed"),
    ("file:///etc/passwd", "uses the 'file' scheme"),
    ("gopher://example.com/", "uses the 'gopher' scheme"),
    ("//example.com/a.png", "must be an absolute http:// or https:// URL"),
    ("example.com/a.png", "must be an absolute http:// or https:// URL"),
    ("http://user:pw@example.com/a.png", "must not contain a user name or password"),
    ("http:///a.png", "has no host"),
    ("http://example.com:99999/", "is not a valid URL"),
    ("http://exa mple.com\r\nX: y/", "control characters"),
    ("", "image_url is empty"),
])
def test_bad_urls_are_refused(url, fragment):
    raises(ImageFetchError, fragment, fetch_url, url, LIMITS)


def test_body_size_caps(server):
    small = InputLimits(allow_hosts=("127.0.0.1",), max_image_bytes=1000)
    raises(ImageFetchError, "the response is 9.8 KiB (Content-Length), over the limit of 1000 bytes",
           fetch_url, server["base"] + "/big-declared", small)
    raises(ImageFetchError, "the response is larger than the limit of 1000 bytes; stopped reading",
           fetch_url, server["base"] + "/big-stream", small)
    raises(ImageFetchError, "larger than the limit of 1000 bytes", fetch_url, server["base"] + "/big-chunked", small)


def test_timeouts(server):
    quick = InputLimits(allow_hosts=("127.0.0.1",), fetch_read_timeout_s=0.3, fetch_total_timeout_s=5)
    start = time.monotonic()
    raises(ImageFetchError, "'127.0.0.1' sent nothing for 0.3 s; timed out", fetch_url, server["base"] + "/slow", quick)
    assert time.monotonic() - start < 1.2
    # Bytes trickle in faster than the read timeout: only the overall deadline stops them, in the body
    # and while headers are being read (where the watchdog has to shut the socket down).
    trickle = InputLimits(allow_hosts=("127.0.0.1",), fetch_read_timeout_s=1, fetch_total_timeout_s=0.6)
    for path in ("/drip-body", "/drip-headers"):
        start = time.monotonic()
        raises(ImageFetchError, "image_url took longer than 0.6 s in total", fetch_url, server["base"] + path, trickle)
        assert time.monotonic() - start < 1.2, path


def test_connect_failures(monkeypatch, fake_dns):
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    raises(ImageFetchError, f"127.0.0.1:{port} refused the connection", fetch_url, f"http://127.0.0.1:{port}/", LOCAL)

    def hang(sock, address):
        raise TimeoutError("timed out")

    monkeypatch.setattr(socket.socket, "connect", hang)
    raises(ImageFetchError, "connecting to 127.0.0.1:80 timed out after 5 s", fetch_url, "http://127.0.0.1/", LOCAL)

    def slow_dns(host, *args, **kwargs):
        time.sleep(1)
        return []

    monkeypatch.setattr(socket, "getaddrinfo", slow_dns)
    raises(ImageFetchError, "looking up host 'slow.test' timed out after 0.2 s", fetch_url, "http://slow.test/",
           InputLimits(fetch_connect_timeout_s=0.2))


# -------------------------------------------------------------------------------------------------- TLS

@pytest.fixture(scope="module")
def tls_server(tmp_path_factory) -> Iterator[tuple[int, Path, list[str | None]]]:
    """An HTTPS server on 127.0.0.1 with a self-signed certificate for images.test."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is needed to make a test certificate")
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-days", "1", "-subj", "/CN=images.test", "-addext", "subjectAltName=DNS:images.test",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    seen: list[str | None] = []

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Length", str(len(PNG)))
            self.end_headers()
            self.wfile.write(PNG)

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    context.sni_callback = lambda sock, name, ctx: seen.append(name)
    httpd = Server(("127.0.0.1", 0), Handler)
    httpd.socket = context.wrap_socket(httpd.socket, server_side=True)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield httpd.server_address[1], cert, seen
    httpd.shutdown()
    httpd.server_close()


def test_https_uses_the_host_name_for_sni_and_the_certificate(monkeypatch, fake_dns, tls_server):
    port, cert, seen = tls_server
    monkeypatch.setattr(fetch_module, "_tls_context", lambda: ssl.create_default_context(cafile=str(cert)))
    limits = InputLimits(allow_hosts=("images.test", "other.test"))
    assert fetch_url(f"https://images.test:{port}/a.png", limits) == PNG
    assert seen[-1] == "images.test"
    raises(ImageFetchError, "the TLS certificate of 'other.test' was refused", fetch_url,
           f"https://other.test:{port}/a.png", limits)
    monkeypatch.setattr(fetch_module, "_tls_context", ssl.create_default_context)  # system CAs only
    raises(ImageFetchError, "certificate of 'images.test' was refused", fetch_url,
           f"https://images.test:{port}/a.png", limits)
