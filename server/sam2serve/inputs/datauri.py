"""RFC 2397 data URIs carrying a base64 image: ``data:[<mediatype>][;base64],<data>``, read strictly."""

from __future__ import annotations

import binascii
import re

from sam2serve.errors import ImageTooLarge, InvalidInput
from sam2serve.limits import describe_bytes

FIELD = "image_data_uri"
_MAX_HEADER = 1024  # characters between "data:" and ","
_TOKEN = r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_MEDIA_TYPE = re.compile(rf"({_TOKEN})/({_TOKEN})")
_PARAMETER = re.compile(rf'{_TOKEN}=({_TOKEN}|"[^"\\]*")')
_ACCEPTED_NON_IMAGE = {"application/octet-stream"}


def _preview(text: str, n: int = 24) -> str:
    return repr(text[:n] + ("…" if len(text) > n else ""))


def decoded_size_upper_bound(payload_len: int) -> int:
    """Bytes that `payload_len` base64 characters can decode to, at most."""
    return (payload_len + 3) // 4 * 3


def _payload_start(uri: str) -> int:
    """Where the header of `uri` ends (its ','); InvalidInput when it has none within _MAX_HEADER."""
    if uri[:5].lower() != "data:":
        raise InvalidInput(f"{FIELD} must start with 'data:' (got {_preview(uri, 16)}); "
                           f"send data:image/png;base64,<base64 data>")
    comma = uri.find(",", 5, 5 + _MAX_HEADER + 1)
    if comma < 0:
        raise InvalidInput(f"{FIELD} has no ',' between its media type and its data "
                           f"(expected data:image/png;base64,<base64 data>)")
    return comma


def check_data_uri_size(uri: str, max_bytes: int) -> None:
    """ImageTooLarge if the payload of `uri` decodes to more than `max_bytes`, judged from its length alone
    (no decoding): what a server checks before it keeps the request."""
    comma = _payload_start(uri)
    payload_len = len(uri) - comma - 1
    estimate = decoded_size_upper_bound(payload_len) - uri[-2:].count("=") if payload_len else 0
    if estimate > max_bytes:
        raise ImageTooLarge(f"{FIELD} holds about {describe_bytes(estimate)}, over the limit of "
                            f"{describe_bytes(max_bytes)}")


def parse_data_uri(uri: str, max_bytes: int) -> bytes:
    """The decoded payload of a base64 data URI; InvalidInput / ImageTooLarge naming image_data_uri.

    The media type may be empty, ``image/*`` or ``application/octet-stream``: it is not trusted either way,
    the decoder sniffs the bytes. Whitespace, URL-safe base64 and missing padding are refused, as is
    URL-encoded (non-base64) data. The size is checked from the length before anything is decoded.
    """
    if not isinstance(uri, str):
        raise TypeError(f"{FIELD} must be a str, got {type(uri).__name__}")
    if not uri:
        raise InvalidInput(f"{FIELD} is empty")
    comma = _payload_start(uri)
    header, payload = uri[5:comma], uri[comma + 1:]
    parts = header.split(";")
    if parts[-1].lower() != "base64":
        raise InvalidInput(f"{FIELD} must be base64-encoded (data:image/png;base64,<data>); "
                           f"URL-encoded data is not accepted")
    media_type, params = parts[0], parts[1:-1]
    if media_type:
        match = _MEDIA_TYPE.fullmatch(media_type)
        if match is None:
            raise InvalidInput(f"{FIELD} has a malformed media type {_preview(media_type)}")
        if match.group(1).lower() != "image" and media_type.lower() not in _ACCEPTED_NON_IMAGE:
            raise InvalidInput(f"{FIELD} has media type {_preview(media_type)}; expected an image/* type")
    elif params:
        raise InvalidInput(f"{FIELD} has parameters but no media type")
    for param in params:
        if _PARAMETER.fullmatch(param) is None:
            raise InvalidInput(f"{FIELD} has a malformed media type parameter {_preview(param)}")
    if not payload:
        raise InvalidInput(f"{FIELD} has no data after ','")
    check_data_uri_size(uri, max_bytes)
    try:
        data = binascii.a2b_base64(payload, strict_mode=True)
    except (binascii.Error, ValueError) as exc:
        hint = ""
        if any(c in payload for c in "-_"):
            hint = " (URL-safe base64 with '-' and '_' is not accepted; use '+' and '/')"
        elif any(c.isspace() for c in payload):
            hint = " (remove line breaks and spaces)"
        raise InvalidInput(f"{FIELD} is not valid base64: {exc}{hint}") from None
    if len(data) > max_bytes:  # unreachable given the estimate; kept as the authoritative check
        raise ImageTooLarge(f"{FIELD} holds {describe_bytes(len(data))}, over the limit of "
                            f"{describe_bytes(max_bytes)}")
    return data
