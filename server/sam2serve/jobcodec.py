"""Bytes for jobs kept outside the process (the Redis queue): requests and outcomes, without pickle.

A shared broker is a trust boundary of its own, so nothing read back from it may run code: values are
written as JSON plus one trailing block of raw bytes (images, RLE counts, arrays), and only the
dataclasses registered here are rebuilt.
"""

from __future__ import annotations

import dataclasses
import json
import struct
from typing import Any

import numpy as np

from .amg.params import GeneratorParams
from .domain import GenerationResult, MaskRecord, OutputOptions, SegmentOutcome, SegmentRequest
from .outputs import RenderedOutputs
from .outputs.encode import EncodedImage

_TYPES: dict[str, type] = {t.__name__: t for t in (
    SegmentRequest, GeneratorParams, OutputOptions, SegmentOutcome, GenerationResult, MaskRecord, RenderedOutputs,
    EncodedImage)}
_HEADER = struct.Struct(">I")  # length of the JSON part


class CodecError(ValueError):
    """Stored bytes that are not a value this module wrote."""


def encode(value: SegmentRequest | SegmentOutcome) -> bytes:
    blobs = _Blobs()
    document = json.dumps(_plain(value, blobs), separators=(",", ":")).encode()
    return _HEADER.pack(len(document)) + document + b"".join(blobs.parts)


def decode(data: bytes) -> Any:
    try:
        (length,) = _HEADER.unpack_from(data)
        document = json.loads(data[_HEADER.size:_HEADER.size + length])
        return _rebuild(document, memoryview(data)[_HEADER.size + length:])
    except (struct.error, ValueError, KeyError, TypeError, RecursionError) as e:
        raise CodecError(f"not an encoded job value: {e}") from e


class _Blobs:
    def __init__(self) -> None:
        self.parts: list[bytes] = []
        self.size = 0

    def add(self, data: bytes) -> list[int]:
        """Append raw bytes; their [offset, length] in the trailing block."""
        span = [self.size, len(data)]
        self.parts.append(data)
        self.size += len(data)
        return span


def _plain(value: Any, blobs: _Blobs) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        if type(value).__name__ not in _TYPES:
            raise TypeError(f"{type(value).__name__} is not registered for encoding")
        fields = {f.name: _plain(getattr(value, f.name), blobs) for f in dataclasses.fields(value)}
        return {"$type": type(value).__name__, "fields": fields}
    if isinstance(value, bytes):
        return {"$bytes": blobs.add(value)}
    if isinstance(value, np.ndarray):
        array = np.ascontiguousarray(value)
        return {"$array": blobs.add(array.tobytes()), "dtype": array.dtype.str, "shape": list(array.shape)}
    if isinstance(value, tuple):
        return {"$tuple": [_plain(v, blobs) for v in value]}
    if isinstance(value, list):
        return [_plain(v, blobs) for v in value]
    if isinstance(value, dict):
        if not all(isinstance(k, str) for k in value):
            raise TypeError("only dicts with string keys can be encoded")
        return {"$dict": {k: _plain(v, blobs) for k, v in value.items()}}
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"cannot encode {type(value).__name__}")


def _rebuild(node: Any, payload: memoryview) -> Any:
    if isinstance(node, list):
        return [_rebuild(v, payload) for v in node]
    if not isinstance(node, dict):
        return node
    if "$type" in node:
        kind = _TYPES[node["$type"]]
        return kind(**{k: _rebuild(v, payload) for k, v in node["fields"].items()})
    if "$bytes" in node:
        return _slice(payload, node["$bytes"])
    if "$array" in node:
        dtype = np.dtype(node["dtype"])
        if dtype.hasobject:
            raise CodecError("object arrays are not stored")
        return np.frombuffer(_slice(payload, node["$array"]), dtype=dtype).reshape(node["shape"]).copy()
    if "$tuple" in node:
        return tuple(_rebuild(v, payload) for v in node["$tuple"])
    if "$dict" in node:
        return {k: _rebuild(v, payload) for k, v in node["$dict"].items()}
    raise CodecError(f"unknown node {sorted(node)}")


def _slice(payload: memoryview, span: list[int]) -> bytes:
    start, length = span
    if start < 0 or length < 0 or start + length > len(payload):
        raise CodecError("a stored value points outside its data")
    return bytes(payload[start:start + length])
