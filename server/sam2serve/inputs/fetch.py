"""image_url: the image's bytes through the guarded outbound client (`sam2serve.outbound`), its refusals and
failures as ImageFetchError naming the field."""

from __future__ import annotations

from sam2serve import outbound
from sam2serve.errors import ImageFetchError
from sam2serve.limits import InputLimits

FIELD = "image_url"


def fetch_url(url: str, limits: InputLimits) -> bytes:
    """The body of `url` (following redirects), or ImageFetchError saying why not."""
    if not isinstance(url, str):
        raise TypeError(f"{FIELD} must be a str, got {type(url).__name__}")
    if not url.strip():
        raise ImageFetchError(f"{FIELD} is empty")
    try:
        return outbound.get(url, limits, FIELD)
    except outbound.OutboundError as e:
        raise ImageFetchError(str(e)) from None
