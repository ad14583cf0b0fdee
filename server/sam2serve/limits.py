"""Limits on what a request may make the server fetch, hold and decode."""

from __future__ import annotations

from dataclasses import dataclass

MiB = 1024 * 1024


@dataclass(frozen=True)
class InputLimits:
    """Per-server limits for image inputs (image_url, image_data_uri, image_bytes).

    - ``max_image_bytes``: encoded size, whatever the source (fetched body, decoded data URI, raw bytes).
    - ``max_pixels``: width × height, checked from the file header before any pixel is decoded.
    - ``fetch_*_timeout_s``: TCP connect (and DNS lookup), silence between two reads, and the whole fetch
      including redirects.
    - ``max_redirects``: redirects followed; one more is an error.
    - ``allow_private_networks``: let image_url reach loopback, private, link-local, CGNAT and other
      non-public addresses. Cloud metadata endpoints stay blocked unless named in ``allow_hosts``.
    - ``allow_hosts``: host names (exact, case-insensitive) or IP addresses / CIDR networks that bypass
      the address block. A host name entry trusts that name only: a redirect to the address it resolves to,
      spelled as an IP, is still checked.
    """

    max_image_bytes: int = 20 * MiB
    max_pixels: int = 40_000_000
    fetch_connect_timeout_s: float = 5.0
    fetch_read_timeout_s: float = 15.0
    fetch_total_timeout_s: float = 30.0
    max_redirects: int = 3
    allow_private_networks: bool = False
    allow_hosts: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.max_image_bytes <= 0 or self.max_pixels <= 0:
            raise ValueError("max_image_bytes and max_pixels must be positive")
        if min(self.fetch_connect_timeout_s, self.fetch_read_timeout_s, self.fetch_total_timeout_s) <= 0:
            raise ValueError("fetch timeouts must be positive")
        if self.max_redirects < 0:
            raise ValueError("max_redirects must be >= 0")
        if isinstance(self.allow_hosts, str):
            raise TypeError("allow_hosts must be a tuple of strings, not one string")
        object.__setattr__(self, "allow_hosts", tuple(self.allow_hosts))


DEFAULT_MAX_DECODER_PROMPTS = 64 * 64 * 5  # a 64-point grid over the image and one crop layer


@dataclass(frozen=True)
class AdmissionLimits:
    """Checked at submission, whatever the protocol.

    - ``max_decoder_prompts``: the work one request may ask for, as `decoder_prompts` counts it (grid × crops,
      × (1 + candidates per prompt) with use_m2m). Within the parameter ranges a request could otherwise ask
      for 1.4 million prompts: about 20 hours of one CPU worker.
    - ``max_image_bytes``: the image cap (`InputLimits.max_image_bytes`), judged from the request's value
      before the request is queued, so that a queue of too-large images is never held.
    - ``outbound``: the address rules a ``webhook_url`` must pass at submission (image_url's), so that a
      refused webhook is the caller's INVALID_ARGUMENT, not a warning in the log when the job ends.
    """

    max_decoder_prompts: int = DEFAULT_MAX_DECODER_PROMPTS
    max_image_bytes: int = 20 * MiB
    outbound: InputLimits = InputLimits()


def describe_bytes(n: int) -> str:
    """'20 MiB', '1.5 MiB', '300 KiB' or '12 bytes', for error messages."""
    for unit, size in (("GiB", 1024**3), ("MiB", MiB), ("KiB", 1024)):
        if n >= size:
            value = n / size
            return f"{value:.0f} {unit}" if value == int(value) else f"{value:.1f} {unit}"
    return f"{n} byte" if n == 1 else f"{n} bytes"
