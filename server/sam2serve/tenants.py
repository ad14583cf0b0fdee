"""API keys and the tenants they belong to, for every protocol.

Keys are given as `--api-key KEY` (one key, of the default tenant: the form kept from before tenants), and/or
`--api-keys "tenant:key,tenant:key"` and `--api-keys-file FILE` (one `tenant:key` per line; blank lines and
`#` comments ignored). A key is split from its tenant at the first ':' (keys may hold ':'); a tenant may hold
several keys (rotation). Without any key nothing is authenticated and every caller is the default tenant.

A request id is visible only to the tenant whose key submitted it (`jobs.service`); another tenant is told it
does not exist, in the words used for an unknown id."""

from __future__ import annotations

import hmac
import re
from dataclasses import dataclass
from pathlib import Path

from .errors import StartupError

DEFAULT_TENANT = ""  # the tenant of --api-key, and of every caller when no key is configured
DEFAULT_LABEL = "default"  # how metrics name it
OTHER_LABEL = "other"  # metrics: tenants beyond the labelled ones
TENANT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


@dataclass(frozen=True)
class ApiKeys:
    keys: tuple[tuple[bytes, str], ...] = ()  # (key, tenant)

    @property
    def required(self) -> bool:
        return bool(self.keys)

    @property
    def tenants(self) -> tuple[str, ...]:
        """The tenants, each once, in the order their first key was given."""
        return tuple(dict.fromkeys(tenant for _, tenant in self.keys))

    def tenant_of(self, authorization: str | bytes) -> str | None:
        """The tenant of the key an `authorization` value (`Key <key>` or `Bearer <key>`) carries; None when it
        carries none of them. Every key is compared, in constant time each."""
        if not self.keys:
            return DEFAULT_TENANT
        text = authorization.decode(errors="replace") if isinstance(authorization, bytes) else authorization
        scheme, _, token = text.partition(" ")
        if scheme.lower() not in ("key", "bearer"):
            return None
        presented, found = token.strip().encode(), None
        for key, tenant in self.keys:
            if hmac.compare_digest(presented, key):
                found = tenant
        return found


def parse_entries(text: str, where: str) -> list[tuple[str, str]]:
    """(tenant, key) of each `tenant:key` entry of `text` (separated by commas or lines); StartupError naming
    the entry's position (never the key) when one is malformed."""
    entries = []
    lines = [part.strip() for line in text.splitlines() for part in line.split("#", 1)[0].split(",")]
    for number, entry in enumerate((e for e in lines if e), start=1):
        tenant, sep, key = entry.partition(":")
        tenant, key = tenant.strip(), key.strip()
        if not sep or not key:
            raise StartupError(f"{where}: entry {number} is not 'tenant:key'")
        if not TENANT_NAME.fullmatch(tenant):
            raise StartupError(f"{where}: entry {number}: tenant names are 1-64 letters, digits, '_', '.' or '-', "
                               "starting with a letter or digit")
        entries.append((tenant, key))
    return entries


def api_keys(api_key: str = "", entries: str = "", entries_file: str = "") -> ApiKeys:
    """The keys a server accepts, from its configuration (see the module's doc)."""
    pairs = [(DEFAULT_TENANT, api_key)] if api_key else []
    pairs += parse_entries(entries, "api_keys")
    if entries_file:
        try:
            text = Path(entries_file).read_text()
        except OSError as e:
            raise StartupError(f"api_keys_file {entries_file!r} cannot be read: {e.strerror}") from None
        pairs += parse_entries(text, f"api_keys_file {entries_file!r}")
    owners: dict[str, str] = {}
    for tenant, key in pairs:
        if owners.setdefault(key, tenant) != tenant:
            raise StartupError(f"one API key is given for two tenants ({owners[key] or DEFAULT_LABEL!r} and "
                               f"{tenant or DEFAULT_LABEL!r}); a key must name one tenant")
    return ApiKeys(tuple((key.encode(), tenant) for key, tenant in owners.items()))


class TenantLabels:
    """Label values for per-tenant metrics, bounded: the first `limit` tenants (in configuration order) have
    their own, every other one is 'other'; the default tenant is 'default'."""

    def __init__(self, tenants: tuple[str, ...], limit: int) -> None:
        self._labelled = frozenset([t for t in tenants if t != DEFAULT_TENANT][:limit])

    def __call__(self, tenant: str) -> str:
        if tenant == DEFAULT_TENANT:
            return DEFAULT_LABEL
        return tenant if tenant in self._labelled else OTHER_LABEL
