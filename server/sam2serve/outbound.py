"""The guarded outbound HTTP client: every request the server makes to an address a caller chose (image_url
fetches, webhooks) goes through here, so that a caller cannot reach what the server can reach.

- http and https only, at every hop; no credentials in URLs; at most ``max_redirects`` redirects.
- The host is resolved once per hop (``socket.getaddrinfo``), every address is checked, and the
  connection goes to a checked address — there is no second lookup for a DNS-rebinding attacker to answer
  differently. The Host header, TLS SNI and the certificate check use the host name from the URL.
- Refused: loopback, private (RFC 1918, ULA), link-local, multicast, reserved, unspecified, carrier-grade
  NAT (100.64.0.0/10) and other non-global addresses, IPv4 addresses embedded in IPv6 (mapped, 6to4,
  NAT64) judged as IPv4, and cloud metadata endpoints by address or name. A host that resolves to any
  refused address is refused, even if it has public addresses too. ``allow_hosts`` names hosts or networks
  that bypass this; ``allow_private_networks`` lifts it except for metadata endpoints.
- Timeouts: connect (and DNS), silence between reads, and an overall deadline that a watchdog enforces by
  shutting the socket down, so a server trickling bytes cannot hold a worker past it.
- The body is capped at ``max_image_bytes``: a larger Content-Length is refused before reading, a longer
  stream is cut off. ``Accept-Encoding: identity``; no cookies, no Authorization, no Referer, and proxy
  environment variables are not used. The body's type is not trusted: the decoder sniffs it.
"""

from __future__ import annotations

import contextlib
import functools
import http.client
import ipaddress
import socket
import ssl
import threading
import time
from dataclasses import dataclass
from http import HTTPStatus
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from typing import Any
from urllib.parse import quote, urljoin, urlsplit

from sam2serve import __version__
from sam2serve.limits import InputLimits, describe_bytes

MAX_URL_LENGTH = 8192
USER_AGENT = f"sam2serve/{__version__} (image fetch)"
_CHUNK = 64 * 1024
_REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
METADATA_HOSTS = frozenset({"metadata.google.internal", "metadata.goog"})
METADATA_ADDRESSES = frozenset(ipaddress.ip_address(a) for a in (
    "169.254.169.254",  # AWS, GCP, Azure, OpenStack, Oracle, DigitalOcean
    "169.254.170.2",  # AWS ECS task metadata
    "fd00:ec2::254",  # AWS IMDS over IPv6
    "100.100.100.200",  # Alibaba Cloud
))
_CGNAT = IPv4Network("100.64.0.0/10")
_NAT64 = IPv6Network("64:ff9b::/96")
_PATH_SAFE = "/%:@!$&'()*+,;=-._~"
_QUERY_SAFE = _PATH_SAFE + "?"

IPAddress = IPv4Address | IPv6Address


class OutboundError(Exception):
    """The request was refused or failed; the message names the field the URL came from and why."""


class AddressRefused(OutboundError):
    """The URL itself is refused (its form, scheme or address under the address rules): trying again cannot
    help, unlike a failed lookup, connection or response."""


# ---------------------------------------------------------------------------------------------- addresses

def _embedded_ipv4(ip: IPv6Address) -> IPv4Address | None:
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip in _NAT64:
        return IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def is_metadata_address(ip: IPAddress) -> bool:
    if isinstance(ip, IPv6Address):
        embedded = _embedded_ipv4(ip)
        if embedded is not None and embedded in METADATA_ADDRESSES:
            return True
        ip = IPv6Address(ip.compressed.split("%")[0]) if ip.scope_id else ip
    return ip in METADATA_ADDRESSES


def blocked_reason(address: IPAddress | str) -> str | None:
    """Why `address` may not be fetched from by default ("a loopback address", …), or None if it is public."""
    ip = ipaddress.ip_address(address) if isinstance(address, str) else address
    if is_metadata_address(ip):
        return "a cloud metadata address"
    if isinstance(ip, IPv6Address):
        embedded = _embedded_ipv4(ip)
        if embedded is not None:
            inner = blocked_reason(embedded)
            return f"{inner} (as IPv4 {embedded} inside IPv6)" if inner else None
        if ip.is_site_local:
            return "a site-local address"
    if ip.is_unspecified:
        return "the unspecified address"
    if ip.is_loopback:
        return "a loopback address"
    if ip.is_link_local:
        return "a link-local address"
    if ip.is_multicast:
        return "a multicast address"
    if isinstance(ip, IPv4Address) and ip in _CGNAT:
        return "a carrier-grade NAT address (100.64.0.0/10)"
    if ip.is_reserved:
        return "a reserved address"
    if ip.is_private:
        return "a private address"
    if not ip.is_global:
        return "a non-public address"
    return None


@dataclass(frozen=True)
class _AllowList:
    names: frozenset[str]
    networks: tuple[IPv4Network | IPv6Network, ...]

    def allows_ip(self, ip: IPAddress) -> bool:
        candidates = [ip]
        if isinstance(ip, IPv6Address):
            if ip.scope_id:
                candidates.append(IPv6Address(ip.compressed.split("%")[0]))
            if ip.ipv4_mapped is not None:
                candidates.append(ip.ipv4_mapped)
        return any(c.version == net.version and c in net for c in candidates for net in self.networks)


def _normalise_host(host: str) -> str:
    return host.strip().rstrip(".").lower()


@functools.lru_cache(maxsize=32)
def _allow_list(entries: tuple[str, ...]) -> _AllowList:
    names, networks = set(), []
    for entry in entries:
        text = entry.strip().strip("[]")
        try:
            networks.append(ipaddress.ip_network(text, strict=False))
        except ValueError:
            names.add(_normalise_host(text))
    return _AllowList(frozenset(names), tuple(networks))


def address_refusal(host: str, ip: IPAddress, limits: InputLimits) -> str | None:
    """Why image_url may not connect to `ip` (resolved from `host`) under `limits`, or None if it may."""
    allow = _allow_list(limits.allow_hosts)
    if _normalise_host(host) in allow.names or allow.allows_ip(ip):
        return None
    if is_metadata_address(ip):
        return "a cloud metadata address"
    if limits.allow_private_networks:
        return None
    return blocked_reason(ip)


# ------------------------------------------------------------------------------------------------ targets

@dataclass(frozen=True)
class _Target:
    url: str
    scheme: str
    host: str  # ASCII (IDNA), lower case, no brackets
    port: int
    literal: IPAddress | None
    request_target: str  # path and query, percent-encoded


def _shown(url: str, n: int = 100) -> str:
    return repr(url if len(url) <= n else url[:n] + "…")


def _parse_target(url: str, where: str) -> _Target:
    if len(url) > MAX_URL_LENGTH:
        raise AddressRefused(f"{where} is longer than {MAX_URL_LENGTH} characters")
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in url):
        raise AddressRefused(f"{where} contains control characters")
    url = url.strip()
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise AddressRefused(f"{where} is not a valid URL ({exc}): {_shown(url)}") from None
    scheme = parts.scheme.lower()
    if not scheme:
        raise AddressRefused(f"{where} must be an absolute http:// or https:// URL, got {_shown(url)}")
    if scheme not in ("http", "https"):
        raise AddressRefused(f"{where} uses the {scheme!r} scheme; only http and https are allowed")
    if parts.username is not None or parts.password is not None:
        raise AddressRefused(f"{where} must not contain a user name or password")
    raw_host = parts.hostname or ""
    if not raw_host:
        raise AddressRefused(f"{where} has no host: {_shown(url)}")
    literal: IPAddress | None
    try:
        literal = ipaddress.ip_address(raw_host)
        host = raw_host
    except ValueError:
        literal = None
        try:
            host = raw_host.encode("idna").decode("ascii").lower()
        except UnicodeError:
            raise AddressRefused(f"{where} has an invalid host name {raw_host!r}") from None
    if port == 0:
        raise AddressRefused(f"{where} has an invalid port 0")
    path = quote(parts.path or "/", safe=_PATH_SAFE)
    query = quote(parts.query, safe=_QUERY_SAFE)
    target = path + (f"?{query}" if query or url.endswith("?") else "")
    return _Target(url, scheme, host, port or (443 if scheme == "https" else 80), literal, target)


# ------------------------------------------------------------------------------------------------ timing

class _Deadline:
    """The overall deadline. A watchdog shuts the current socket down when it passes, which wakes any read
    blocked in http.client (header parsing included) so the fetch ends within the deadline."""

    def __init__(self, total_s: float, field: str) -> None:
        self.total_s, self.field = total_s, field
        self._expires = time.monotonic() + total_s
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self.expired = False
        self._timer = threading.Timer(total_s, self._fire)
        self._timer.daemon = True
        self._timer.start()

    def remaining(self) -> float:
        return self._expires - time.monotonic()

    def bounded(self, timeout_s: float) -> float:
        """`timeout_s`, shortened to what is left; raises once nothing is."""
        left = self.remaining()
        if self.expired or left <= 0:
            raise self.error()
        return max(min(timeout_s, left), 0.001)

    def watch(self, sock: socket.socket | None) -> None:
        with self._lock:
            self._sock = sock
            if self.expired and sock is not None:
                self._shutdown(sock)

    def _fire(self) -> None:
        with self._lock:
            self.expired = True
            if self._sock is not None:
                self._shutdown(self._sock)

    @staticmethod
    def _shutdown(sock: socket.socket) -> None:
        # The plain socket's shutdown, also for an SSLSocket: ends the stream under any blocked reader.
        with contextlib.suppress(OSError):
            socket.socket.shutdown(sock, socket.SHUT_RDWR)

    def error(self) -> OutboundError:
        return OutboundError(f"{self.field} took longer than {self.total_s:g} s in total; gave up")

    def cancel(self) -> None:
        self._timer.cancel()


def _resolve(host: str, port: int, timeout_s: float, where: str) -> list[IPAddress]:
    """Addresses of `host` in resolver order; the lookup runs in a thread so that it obeys `timeout_s`."""
    found: list[tuple[Any, ...]] = []

    def lookup() -> None:
        with contextlib.suppress(Exception):  # any failure is "could not be resolved"
            found.extend(socket.getaddrinfo(host, port, type=socket.SOCK_STREAM))

    thread = threading.Thread(target=lookup, name="image_url-dns", daemon=True)
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        raise OutboundError(f"{where}: looking up host {host!r} timed out after {timeout_s:g} s")
    if not found:
        raise OutboundError(f"{where}: host {host!r} could not be resolved")
    addresses: list[IPAddress] = []
    for family, _, _, _, sockaddr in found:
        if family not in (socket.AF_INET, socket.AF_INET6):
            continue
        ip = ipaddress.ip_address(sockaddr[0])
        if isinstance(ip, IPv6Address) and len(sockaddr) >= 4 and sockaddr[3] and not ip.scope_id:
            ip = IPv6Address(f"{ip}%{sockaddr[3]}")
        if ip not in addresses:
            addresses.append(ip)
    if not addresses:
        raise OutboundError(f"{where}: host {host!r} has no IPv4 or IPv6 address")
    return addresses


# ------------------------------------------------------------------------------------------- connections

@functools.lru_cache(maxsize=1)
def _tls_context() -> ssl.SSLContext:
    context = ssl.create_default_context()
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


def _sockaddr(ip: IPAddress, port: int) -> tuple[socket.AddressFamily, tuple]:
    if isinstance(ip, IPv4Address):
        return socket.AF_INET, (str(ip), port)
    scope = ip.scope_id or ""
    index = int(scope) if scope.isdigit() else (socket.if_nametoindex(scope) if scope else 0)
    return socket.AF_INET6, (str(ip).split("%")[0], port, 0, index)


class _PinnedConnection(http.client.HTTPConnection):
    """An HTTP(S) connection to one already-checked IP address; Host, SNI and certificate use `host`."""

    def __init__(self, target: _Target, ip: IPAddress, limits: InputLimits, deadline: _Deadline) -> None:
        super().__init__(target.host, target.port, timeout=limits.fetch_connect_timeout_s)
        self.default_port = 443 if target.scheme == "https" else 80
        self._ip = ip
        self._tls = target.scheme == "https"
        self._limits = limits
        self._deadline = deadline

    def connect(self) -> None:
        family, sockaddr = _sockaddr(self._ip, self.port)
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            self._deadline.watch(sock)
            sock.settimeout(self._deadline.bounded(self._limits.fetch_connect_timeout_s))
            sock.connect(sockaddr)  # a numeric address: no name lookup here
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self._tls:
                sock.settimeout(self._deadline.bounded(self._limits.fetch_connect_timeout_s))
                sock = _tls_context().wrap_socket(sock, server_hostname=self.host)
                self._deadline.watch(sock)
        except BaseException:
            sock.close()
            raise
        self.sock = sock


def _status_text(status: int, reason: str) -> str:
    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:
        phrase = "".join(c for c in (reason or "") if c.isprintable())[:60].strip()
    return f"HTTP {status} {phrase}".rstrip()


def _connect(target: _Target, addresses: list[IPAddress], limits: InputLimits, deadline: _Deadline,
             where: str) -> _PinnedConnection:
    last: BaseException | None = None
    for ip in addresses:
        conn = _PinnedConnection(target, ip, limits, deadline)
        try:
            conn.connect()
            return conn
        except OutboundError:
            conn.close()
            raise
        except ssl.SSLCertVerificationError as exc:
            conn.close()
            raise OutboundError(f"{where}: the TLS certificate of {target.host!r} was refused "
                                  f"({exc.verify_message or exc.reason})") from None
        except ssl.SSLError as exc:
            conn.close()
            raise OutboundError(f"{where}: the TLS handshake with {target.host!r} failed "
                                  f"({exc.reason or exc})") from None
        except OSError as exc:
            conn.close()
            last = exc
            if deadline.expired or deadline.remaining() <= 0:
                raise deadline.error() from None
    place = f"{target.host}:{target.port}"
    if isinstance(last, TimeoutError):
        raise OutboundError(f"{where}: connecting to {place} timed out after "
                              f"{limits.fetch_connect_timeout_s:g} s") from None
    if isinstance(last, ConnectionRefusedError):
        raise OutboundError(f"{where}: {place} refused the connection") from None
    detail = getattr(last, "strerror", None) or str(last)
    raise OutboundError(f"{where}: could not connect to {place} ({detail})") from None


def _read_body(response: http.client.HTTPResponse, conn: _PinnedConnection, limits: InputLimits,
               deadline: _Deadline, where: str) -> bytes:
    cap = limits.max_image_bytes
    declared = response.length  # None when chunked or delimited by the connection closing
    if declared is not None and declared > cap:
        raise OutboundError(f"{where}: the response is {describe_bytes(declared)} (Content-Length), over "
                              f"the limit of {describe_bytes(cap)}")
    body = bytearray()
    while True:
        if conn.sock is not None:
            conn.sock.settimeout(deadline.bounded(limits.fetch_read_timeout_s))
        chunk = response.read1(_CHUNK)
        if deadline.expired:
            raise deadline.error()
        if not chunk:
            break
        body += chunk
        if len(body) > cap:
            raise OutboundError(f"{where}: the response is larger than the limit of {describe_bytes(cap)}; "
                                  f"stopped reading")
    if declared is not None and len(body) < declared:
        raise OutboundError(f"{where}: the connection closed after {len(body):,} of {declared:,} bytes")
    return bytes(body)


def _checked_addresses(target: _Target, limits: InputLimits, deadline: _Deadline, where: str) -> list[IPAddress]:
    """The addresses `target` may be connected to, or OutboundError naming the refusal."""
    if target.literal is not None:
        addresses = [target.literal]
        for ip in addresses:
            reason = address_refusal(target.host, ip, limits)
            if reason:
                raise AddressRefused(f"{where} points at {ip}, {reason}; only public addresses are allowed")
        return addresses
    allowed_by_name = _normalise_host(target.host) in _allow_list(limits.allow_hosts).names
    if _normalise_host(target.host) in METADATA_HOSTS and not allowed_by_name:
        raise AddressRefused(f"{where}: host {target.host!r} is a cloud metadata endpoint; not allowed")
    timeout = deadline.bounded(limits.fetch_connect_timeout_s)
    addresses = _resolve(target.host, target.port, timeout, where)
    for ip in addresses:
        reason = address_refusal(target.host, ip, limits)
        if reason:  # the address itself is not shown: it would reveal internal DNS to the caller
            raise AddressRefused(f"{where}: host {target.host!r} resolves to {reason}; "
                                  f"only public addresses are allowed")
    return addresses


def _fetch_once(target: _Target, limits: InputLimits, deadline: _Deadline, where: str) -> tuple[int, str, bytes]:
    """One request: (status, Location or "", body — read only for 2xx)."""
    addresses = _checked_addresses(target, limits, deadline, where)
    conn = _connect(target, addresses, limits, deadline, where)
    try:
        try:
            conn.request("GET", target.request_target, headers={
                "User-Agent": USER_AGENT, "Accept": "image/*, */*;q=0.5", "Connection": "close"})
            assert conn.sock is not None
            conn.sock.settimeout(deadline.bounded(limits.fetch_read_timeout_s))
            response = conn.getresponse()
            status = response.status
            if status in _REDIRECT_STATUSES:
                return status, response.getheader("Location") or "", b""
            if not 200 <= status < 300:
                raise OutboundError(f"{where} returned {_status_text(status, response.reason)}")
            if status in (204, 205):
                raise OutboundError(f"{where} returned {_status_text(status, response.reason)}, no image")
            return status, "", _read_body(response, conn, limits, deadline, where)
        except OutboundError:
            raise
        except TimeoutError:
            if deadline.expired or deadline.remaining() <= 0.01:
                raise deadline.error() from None
            raise OutboundError(f"{where}: {target.host!r} sent nothing for {limits.fetch_read_timeout_s:g} s; "
                                  f"timed out") from None
        except (http.client.HTTPException, OSError) as exc:
            if deadline.expired:
                raise deadline.error() from None
            if isinstance(exc, http.client.IncompleteRead):
                detail = f"the connection closed early ({len(exc.partial):,} bytes received)"
            elif isinstance(exc, http.client.RemoteDisconnected):
                detail = "the server closed the connection without a response"
            elif isinstance(exc, http.client.HTTPException):
                detail = f"a malformed HTTP response ({type(exc).__name__})"
            else:
                detail = f"a network error ({getattr(exc, 'strerror', None) or exc})"
            raise OutboundError(f"{where}: {detail}") from None
    finally:
        deadline.watch(None)
        conn.close()


def get(url: str, limits: InputLimits, field: str) -> bytes:
    """The body of `url` (following redirects), or OutboundError saying why not; messages name `field`."""
    deadline = _Deadline(limits.fetch_total_timeout_s, field)
    try:
        where = field
        target = _parse_target(url, where)
        redirects = 0
        while True:
            status, location, body = _fetch_once(target, limits, deadline, where)
            if status not in _REDIRECT_STATUSES:
                return body
            if not location:
                raise OutboundError(f"{where} returned {_status_text(status, '')} without a Location header")
            redirects += 1
            if redirects > limits.max_redirects:
                raise OutboundError(f"{field} redirected more than {limits.max_redirects} times; gave up")
            next_url = urljoin(target.url, location.strip())
            where = f"{field} (redirected to {_shown(next_url)})"
            target = _parse_target(next_url, where)
    finally:
        deadline.cancel()


def check_destination(url: str, limits: InputLimits, field: str) -> None:
    """AddressRefused when `url` is one the address rules refuse (scheme, form, or any address its host resolves
    to), OutboundError when its host cannot be looked up; checked again, and pinned, when it is called."""
    deadline = _Deadline(limits.fetch_total_timeout_s, field)
    try:
        _checked_addresses(_parse_target(url, field), limits, deadline, field)
    finally:
        deadline.cancel()


def post_json(url: str, body: bytes, limits: InputLimits, field: str, headers: dict[str, str] | None = None) -> int:
    """POST `body` (JSON) to `url` under the same address rules (no redirects followed), with `headers` added.
    Returns the HTTP status; raises AddressRefused when the address is refused, OutboundError when the call
    fails (lookup, connection, no response)."""
    deadline = _Deadline(limits.fetch_total_timeout_s, field)
    try:
        target = _parse_target(url, field)
        conn = _connect(target, _checked_addresses(target, limits, deadline, field), limits, deadline, field)
        try:
            conn.request("POST", target.request_target, body=body, headers={
                **(headers or {}), "User-Agent": USER_AGENT, "Content-Type": "application/json",
                "Connection": "close"})
            assert conn.sock is not None
            conn.sock.settimeout(deadline.bounded(limits.fetch_read_timeout_s))
            response = conn.getresponse()
            response.read(64 * 1024)
            return response.status
        except (http.client.HTTPException, OSError) as exc:
            raise OutboundError(f"{field}: the call failed ({type(exc).__name__})") from None
        finally:
            deadline.watch(None)
            conn.close()
    finally:
        deadline.cancel()
