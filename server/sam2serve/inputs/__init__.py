"""Hostile-input layer for images: image_url, image_data_uri and image_bytes → a checked RGB array.

Everything here raises the domain errors of sam2serve.errors with messages that name the request field:
InvalidInput (not an image, damaged file, bad data URI), ImageTooLarge (byte or pixel limits of a data URI
or raw bytes, and the pixel limit of any source) and ImageFetchError (image_url: bad scheme, blocked
address, HTTP error, timeout, response over the byte limit). No gRPC and no torch in this package.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from sam2serve.errors import ImageFetchError, ImageTooLarge, InvalidInput
from sam2serve.inputs.datauri import check_data_uri_size, parse_data_uri
from sam2serve.inputs.decode import decode, decode_image, sniff_format, to_rgb
from sam2serve.inputs.fetch import fetch_url
from sam2serve.limits import InputLimits, describe_bytes
from sam2serve.outbound import MAX_URL_LENGTH, address_refusal, blocked_reason

__all__ = [
    "InputLimits",
    "LoadedImage",
    "address_refusal",
    "blocked_reason",
    "check_encoded_size",
    "decode_image",
    "fetch_url",
    "load_image",
    "parse_data_uri",
    "sniff_format",
    "to_rgb",
]

# Canonical source kinds, and the request field names the servicer may pass instead.
_KINDS = {"url": "url", "image_url": "url", "data_uri": "data_uri", "image_data_uri": "data_uri",
          "bytes": "bytes", "image_bytes": "bytes"}
FIELD_OF = {"url": "image_url", "data_uri": "image_data_uri", "bytes": "image_bytes"}


@dataclass(frozen=True)
class LoadedImage:
    rgb: np.ndarray  # HxWx3 uint8 RGB, EXIF orientation applied
    source_kind: str  # "url", "data_uri" or "bytes"
    byte_count: int  # size of the encoded image (fetched body, decoded data URI, raw bytes)
    format: str  # "JPEG", "PNG", "WEBP", "BMP" or "TIFF", sniffed from the bytes
    width: int  # of rgb, i.e. after EXIF orientation
    height: int


def check_encoded_size(kind: str, value: str | bytes, max_bytes: int) -> None:
    """The byte cap, judged from the request's value alone (no fetching, no decoding): image_bytes by their
    length, a data URI by its base64 length, an image_url by its length (MAX_URL_LENGTH). What a server checks
    before it keeps a request; `load_image` checks the bytes it gets again."""
    if kind == "bytes":
        if len(value) > max_bytes:
            raise ImageTooLarge(f"image_bytes is {describe_bytes(len(value))}, over the limit of "
                                f"{describe_bytes(max_bytes)}")
    elif kind == "data_uri" and isinstance(value, str):
        check_data_uri_size(value, max_bytes)
    elif kind == "url" and len(value) > MAX_URL_LENGTH:
        raise ImageFetchError(f"image_url is longer than {MAX_URL_LENGTH} characters")


def load_image(source_kind: str | None, value: str | bytes, limits: InputLimits,
               fetched: bytes | None = None) -> LoadedImage:
    """Fetch / parse / take the encoded image, check it against `limits` and decode it. `fetched`: the body of
    the image_url `value` as `fetch_url` returned it in a fetch stage; decoded as if fetched here.

    `source_kind` is "url", "data_uri" or "bytes" (or the field names image_url, image_data_uri,
    image_bytes). None or "" — no image in the request — is an InvalidInput; an unknown kind or a value of
    the wrong Python type is a programming error (ValueError / TypeError).
    """
    if not source_kind:
        raise InvalidInput("no image in the request: set one of image_url, image_data_uri or image_bytes")
    kind = _KINDS.get(source_kind)
    if kind is None:
        raise ValueError(f"unknown image source kind {source_kind!r}; expected one of {sorted(set(_KINDS))}")
    field = FIELD_OF[kind]
    if kind == "url":
        if not isinstance(value, str):
            raise TypeError(f"{field} must be a str, got {type(value).__name__}")
        data = fetch_url(value, limits) if fetched is None else fetched  # fetch_url kept to the byte cap
    elif kind == "data_uri":
        if not isinstance(value, str):
            raise TypeError(f"{field} must be a str, got {type(value).__name__}")
        data = parse_data_uri(value, limits.max_image_bytes)
    else:
        if not isinstance(value, bytes | bytearray | memoryview):
            raise TypeError(f"{field} must be bytes, got {type(value).__name__}")
        data = bytes(value)
        check_encoded_size("bytes", data, limits.max_image_bytes)
    decoded = decode(data, limits, field)
    height, width = decoded.rgb.shape[:2]
    return LoadedImage(decoded.rgb, kind, len(data), decoded.format, width, height)
