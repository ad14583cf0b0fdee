"""Encode rendered arrays as PNG or JPEG files, with the metadata the API returns for each picture."""

from __future__ import annotations

from dataclasses import dataclass, field

import cv2
import numpy as np

# PNG encoding sits on every request's path, so it is tuned for speed: zlib level 1 with the Z_RLE strategy
# and the SUB row filter (OpenCV's own defaults, pinned here because setting the level alone switches the
# strategy to Z_DEFAULT_STRATEGY). Measured on 1024×1024 pictures (2 busy cores): a combined mask ≈ 8 ms /
# 43 KiB, a binary mask ≈ 2–3 ms / 6 KiB, a photo overlay ≈ 35–45 ms / 2.1 MiB; level 1 or 3 with the
# default strategy took 2–4× as long for files of about the same size, and level 6–9 saved at most half of
# an already small mask file for 1.5–3× the time. Flat-coloured masks compress well at any level.
# Single-channel pictures (binary masks) go without a row filter: their 0/255 runs are what Z_RLE wants, and
# filtering only turns them into edge bytes. On 1800×1200 masks (in one run, busy cores) that was 1.2–1.5×
# faster than SUB and 20–40 % smaller, for smooth and for noisy masks alike; prompted calls make 3 per click.
PNG_COMPRESSION = 1
_PNG_PARAMS = [cv2.IMWRITE_PNG_COMPRESSION, PNG_COMPRESSION, cv2.IMWRITE_PNG_STRATEGY, cv2.IMWRITE_PNG_STRATEGY_RLE]
_PNG_GRAY_PARAMS = list(_PNG_PARAMS)
if hasattr(cv2, "IMWRITE_PNG_FILTER"):  # OpenCV >= 4.11
    _PNG_PARAMS += [cv2.IMWRITE_PNG_FILTER, cv2.IMWRITE_PNG_FILTER_SUB]
    _PNG_GRAY_PARAMS += [cv2.IMWRITE_PNG_FILTER, cv2.IMWRITE_PNG_FILTER_NONE]
DEFAULT_JPEG_QUALITY = 90

_FORMATS = {"png": (".png", "image/png"), "jpeg": (".jpg", "image/jpeg"), "webp": (".webp", "image/webp")}
# WebP (fal's prompted endpoint offers it) is written lossless: masks keep exactly 0/255, and flat pictures
# compress well that way.
_WEBP_PARAMS = [cv2.IMWRITE_WEBP_QUALITY, 101]
_ALIASES = {"jpg": "jpeg"}


@dataclass(frozen=True)
class EncodedImage:
    data: bytes = field(repr=False)
    content_type: str
    file_name: str
    file_size: int
    width: int
    height: int


def normalise_format(fmt: str) -> str:
    """'png', 'jpeg' ('jpg' accepted) or 'webp'; anything else is a ValueError."""
    name = _ALIASES.get(fmt, fmt)
    if name not in _FORMATS:
        raise ValueError(f"unsupported image format {fmt!r}: expected 'png', 'jpeg' or 'webp'")
    return name


def encode_image(rgb_or_gray: np.ndarray, fmt: str, file_name_stem: str,
                 jpeg_quality: int = DEFAULT_JPEG_QUALITY) -> EncodedImage:
    """Encode an HxWx3 RGB, HxWx4 RGBA or HxW grayscale uint8 array (a bool mask becomes 0/255) as `fmt`.

    Grayscale arrays are written as 8-bit single-channel files. PNG is lossless, so a binary mask decodes
    to exactly 0/255; JPEG is lossy, so a binary mask comes back with grey values along its edges and a
    combined mask with colours that are not exactly the palette's.
    """
    fmt = normalise_format(fmt)
    if not file_name_stem or "/" in file_name_stem or "\\" in file_name_stem:
        raise ValueError(f"file name stem must be a plain non-empty name, got {file_name_stem!r}")
    if not 1 <= int(jpeg_quality) <= 100:
        raise ValueError(f"jpeg_quality must be within 1..100, got {jpeg_quality}")
    array = _to_opencv(np.asarray(rgb_or_gray))
    extension, content_type = _FORMATS[fmt]
    png = _PNG_GRAY_PARAMS if array.ndim == 2 else _PNG_PARAMS
    params = {"png": png, "webp": _WEBP_PARAMS}.get(fmt, [cv2.IMWRITE_JPEG_QUALITY, int(jpeg_quality)])
    ok, buffer = cv2.imencode(extension, array, params)
    if not ok:
        raise RuntimeError(f"OpenCV could not encode a {array.shape} array as {fmt}")
    data = buffer.tobytes()
    return EncodedImage(data=data, content_type=content_type, file_name=file_name_stem + extension,
                        file_size=len(data), width=int(array.shape[1]), height=int(array.shape[0]))


def _to_opencv(array: np.ndarray) -> np.ndarray:
    """uint8 HxW grayscale, HxWx3 BGR or HxWx4 BGRA (PNG and WebP keep the alpha), as cv2.imencode expects."""
    if array.dtype == np.bool_:
        array = array.view(np.uint8) * np.uint8(255)
    if array.dtype != np.uint8:
        raise ValueError(f"expected a uint8 (or bool) image, got {array.dtype}")
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (3, 4))):
        raise ValueError(f"expected an HxW, HxWx3 or HxWx4 image, got shape {array.shape}")
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise ValueError(f"cannot encode an empty image of shape {array.shape}")
    if array.ndim == 2:
        return np.ascontiguousarray(array)
    conversion = cv2.COLOR_RGB2BGR if array.shape[2] == 3 else cv2.COLOR_RGBA2BGRA
    return cv2.cvtColor(np.ascontiguousarray(array), conversion)
