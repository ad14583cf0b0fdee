"""Encoded image bytes → HxWx3 uint8 RGB, refusing what is not an image or is too big before decoding it.

The file type is sniffed from its magic bytes (never from a header, a media type or a file name) and PIL
is told to use only that format's plugin. Width × height comes from the file header and is checked against
``max_pixels`` before any pixel is decoded, so a small file claiming 100k × 100k pixels costs nothing.

Colour normalisation (SAM 2's reference loads images with PIL's ``.convert("RGB")``; so do we, so that
masks match what Meta's pipeline computes on the same file):

- EXIF orientation is applied (``ImageOps.exif_transpose``); an unreadable EXIF block is ignored.
- Alpha (RGBA, LA, PA, palette with transparency) is **dropped, not composited**: the colour stored under
  transparent pixels is kept, as ``.convert("RGB")`` does.
- Grayscale and bilevel images are replicated to three channels; CMYK, YCbCr, LAB and HSV go through PIL's
  conversions (embedded ICC profiles are not applied).
- 16-bit grayscale (``I;16*``) keeps its 8 high bits; 32-bit integer ``I`` is read as 16-bit (clipped to
  0..65535, then the 8 high bits); float ``F`` is scaled by 255 when all values are within 0..1, else clipped
  to 0..255.
- Multi-frame files (TIFF pages, animated WebP, MPO) give their first frame.
"""

from __future__ import annotations

import io
import re
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageOps

from sam2serve.errors import ImageTooLarge, InvalidInput, Sam2ServeError
from sam2serve.limits import InputLimits, describe_bytes

SUPPORTED = "JPEG, PNG, WebP, BMP or TIFF"
_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")  # classic and BigTIFF, both byte orders


class DecodedImage(NamedTuple):
    rgb: np.ndarray
    format: str  # "JPEG", "PNG", "WEBP", "BMP" or "TIFF"


def sniff_format(data: bytes) -> str | None:
    """PIL's name for the format of `data` from its magic bytes, or None if it is not one we accept."""
    if data[:3] == b"\xff\xd8\xff":
        return "JPEG"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "PNG"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    if data[:2] == b"BM" and len(data) >= 26:
        return "BMP"
    if data[:4] in _TIFF_MAGIC:
        return "TIFF"
    return None


def describe_content(data: bytes) -> str:
    """A few words on what unsupported `data` looks like, for the error message."""
    head = data[:64]
    lower = head.lstrip().lower()
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "a GIF image"
    if head[4:8] == b"ftyp":
        brand = head[8:12]
        if brand in (b"avif", b"avis"):
            return "an AVIF image"
        if brand in (b"heic", b"heix", b"hevc", b"hevx", b"mif1", b"msf1"):
            return "a HEIC/HEIF image"
        return "an ISO media file (MP4/MOV/HEIF family)"
    if head[:4] == b"%PDF":
        return "a PDF document"
    if head[:2] == b"\x1f\x8b":
        return "gzip-compressed data"
    if head[:4] == b"PK\x03\x04":
        return "a ZIP archive"
    if head[:4] == b"RIFF":
        return "a RIFF file that is not WebP"
    if head[:2] == b"BM":
        return "a file too short to be a BMP"
    if lower.startswith((b"<!doctype html", b"<html")):
        return "an HTML page"
    if lower.startswith((b"<svg", b"<?xml")):
        return "XML or SVG text (vector images are not supported)"
    if lower.startswith(b"data:"):
        return "a data URI; send it in image_data_uri"
    if lower.startswith((b"http://", b"https://")):
        return "a URL; send it in image_url"
    if head.startswith((b"iVBORw0KGgo", b"/9j/", b"UklGR", b"Qk", b"SUkq", b"TU0A")):
        return "base64 text; send the decoded bytes, or a data URI in image_data_uri"
    if lower.startswith((b"{", b"[")):
        return "JSON-like text"
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    if text is not None and text.isprintable():
        return f"text starting with {text[:24]!r}"
    return f"unrecognised data starting with {head[:8].hex(' ')}"


def _raise_pil_limit(max_pixels: int) -> None:
    """PIL refuses images over 2 × Image.MAX_IMAGE_PIXELS at open; keep that at least our limit, so that our
    own check decides. Only ever raised, never lowered: other code in the process keeps PIL's guard."""
    current = Image.MAX_IMAGE_PIXELS
    if current is not None and current < max_pixels:
        Image.MAX_IMAGE_PIXELS = max_pixels


def _too_many_pixels(field: str, width: int, height: int, max_pixels: int) -> ImageTooLarge:
    return ImageTooLarge(f"{field} is {width}×{height} = {width * height:,} pixels, over the limit of "
                         f"{max_pixels:,} pixels")


def _gray_to_rgb(gray: np.ndarray) -> np.ndarray:
    return np.repeat(gray[:, :, None], 3, axis=2)


def to_rgb(image: Image.Image) -> np.ndarray:
    """Any PIL image → HxWx3 uint8 RGB (the normalisation the module docstring describes)."""
    mode = image.mode
    if mode.startswith("I;16"):
        return _gray_to_rgb((np.asarray(image).astype(np.uint16) >> 8).astype(np.uint8))
    if mode == "I":
        values = np.clip(np.asarray(image, dtype=np.int64), 0, 65535)
        return _gray_to_rgb((values >> 8).astype(np.uint8))
    if mode == "F":
        floats = np.nan_to_num(np.asarray(image, dtype=np.float64), nan=0.0, posinf=255.0, neginf=0.0)
        if floats.size and floats.min() >= 0.0 and floats.max() <= 1.0:
            floats = floats * 255.0
        return _gray_to_rgb(np.clip(np.rint(floats), 0, 255).astype(np.uint8))
    if mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")  # straight to RGB warns about transparency given as bytes
    elif mode in ("La", "RGBa"):  # premultiplied alpha: PIL converts these only via their straight forms
        image = image.convert("RGBA")
    if image.mode != "RGB":
        image = image.convert("RGB")
    return np.array(image, dtype=np.uint8)


def _apply_exif_orientation(image: Image.Image) -> Image.Image:
    try:
        transposed = ImageOps.exif_transpose(image)
    except Exception:  # a malformed EXIF block does not make the pixels unreadable
        return image
    return transposed if transposed is not None else image


def decode(data: bytes | bytearray | memoryview, limits: InputLimits, field: str) -> DecodedImage:
    """Like decode_image, also returning the sniffed format."""
    data = bytes(data)
    if not data:
        raise InvalidInput(f"{field} is empty")
    if len(data) > limits.max_image_bytes:
        raise ImageTooLarge(f"{field} is {describe_bytes(len(data))}, over the limit of "
                            f"{describe_bytes(limits.max_image_bytes)}")
    fmt = sniff_format(data)
    if fmt is None:
        raise InvalidInput(f"{field} is not a supported image (got {describe_content(data)}); send {SUPPORTED}")
    name = "WebP" if fmt == "WEBP" else fmt
    _raise_pil_limit(limits.max_pixels)
    try:
        with Image.open(io.BytesIO(data), formats=[fmt]) as image:
            width, height = image.size
            if width <= 0 or height <= 0:
                raise InvalidInput(f"{field} is a {name} image with no pixels ({width}×{height})")
            if width * height > limits.max_pixels:
                raise _too_many_pixels(field, width, height, limits.max_pixels)
            image.load()  # the first frame: Image.open leaves multi-frame files there
            oriented = _apply_exif_orientation(image)
            rgb = to_rgb(oriented)
    except Sam2ServeError:
        raise
    except Image.DecompressionBombError as exc:
        found = re.search(r"\((\d+) pixels\)", str(exc))
        size = f"{int(found.group(1)):,} pixels" if found else "too many pixels"
        raise ImageTooLarge(f"{field} is {size}, over the limit of {limits.max_pixels:,} pixels") from None
    except MemoryError:
        raise
    except Image.UnidentifiedImageError:
        raise InvalidInput(f"{field} is a damaged or truncated {name} file (it starts like one but cannot be "
                           f"read as one)") from None
    except Exception as exc:  # PIL plugins raise OSError, SyntaxError, ValueError, EOFError, struct.error, …
        detail = str(exc).strip() or type(exc).__name__
        if len(detail) > 200:
            detail = detail[:200] + "…"
        raise InvalidInput(f"{field} is a damaged or truncated {name} file: {detail}") from None
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:  # defensive: never hand on a bad array
        raise InvalidInput(f"{field} decoded to an unexpected shape {rgb.shape}")
    return DecodedImage(np.ascontiguousarray(rgb), fmt)


def decode_image(data: bytes, limits: InputLimits, field: str) -> np.ndarray:
    """HxWx3 uint8 RGB from encoded bytes; InvalidInput / ImageTooLarge naming `field` otherwise."""
    return decode(data, limits, field).rgb
