"""Webhooks: when a queued job ends, POST {request_id, status[, error]} (or the body of the protocol that took
the request, e.g. fal's) to the URL its request named, under image_url's address rules, off the event loop
(the body too: fal's may hold every mask).

Signed when a secret is configured: `X-Sam2serve-Signature: v1=<hex HMAC-SHA256(secret, timestamp + "." +
body)>` with `X-Sam2serve-Timestamp` (Unix seconds, new at each attempt) and `X-Sam2serve-Request-Id`; without
one they go unsigned (the server warns at startup). A connection failure, a 5xx or a 429 is retried, at most
`attempts` calls in all, waiting backoff_s, 2·backoff_s, … (at most MAX_BACKOFF_S) between them; any other
answer ends the delivery. A failed delivery is counted and logged, and never changes the job's result.

Sent by the process whose store ended the job: in Redis mode, the replica whose fenced final write won, so once
per job (`jobs.redis`)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from prometheus_client import Counter

from .errors import public_message
from .jobs import JobFinished
from .limits import InputLimits
from .outbound import AddressRefused, OutboundError, post_json

log = logging.getLogger(__name__)

SIGNATURE_HEADER = "X-Sam2serve-Signature"
TIMESTAMP_HEADER = "X-Sam2serve-Timestamp"
REQUEST_ID_HEADER = "X-Sam2serve-Request-Id"
MAX_BACKOFF_S = 60.0

Body = Callable[[JobFinished], dict[str, Any]]


def default_body(event: JobFinished) -> dict[str, Any]:
    payload = {"request_id": event.id, "status": event.state.name}
    if event.error is not None:
        payload["error"] = public_message(event.error)
    return payload


def signature(secret: bytes, timestamp: str, body: bytes) -> str:
    """The value of SIGNATURE_HEADER: 'v1=' and the hex HMAC-SHA256 of `timestamp.body` under `secret`."""
    return "v1=" + hmac.new(secret, timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()


def retryable(status: int) -> bool:
    """An answer worth calling again for: the receiver failed or asked to slow down (not a 4xx refusal)."""
    return status >= 500 or status == 429


@dataclass(frozen=True)
class WebhookSettings:
    secret: bytes = b""  # empty: unsigned
    attempts: int = 4  # calls in all, the first included
    backoff_s: float = 1.0  # wait before the second call; doubled before each next one

    def delay(self, retry: int) -> float:
        """The wait before retry number `retry` (1 for the second call)."""
        return min(self.backoff_s * 2 ** (retry - 1), MAX_BACKOFF_S)


@dataclass(frozen=True)
class WebhookMetrics:
    deliveries: Counter  # by outcome: delivered, failed (retries spent or a 4xx), refused (address rules)
    retries: Counter


class Webhooks:
    """A `JobFinished` listener, on the event loop. `bodies`: the body for requests whose
    `delivery["protocol"]` names one."""

    def __init__(self, limits: InputLimits, bodies: Mapping[str, Body] | None = None,
                 settings: WebhookSettings | None = None, metrics: WebhookMetrics | None = None) -> None:
        self._limits = limits
        self._bodies = dict(bodies or {})
        self._settings = settings or WebhookSettings()
        self._metrics = metrics
        self._loop = asyncio.get_running_loop()
        self._deliveries: set[asyncio.Task[str]] = set()

    def __call__(self, event: JobFinished) -> None:
        if not event.request.webhook_url:
            return
        body = self._bodies.get(event.request.delivery.get("protocol", ""), default_body)
        task = self._loop.create_task(self.deliver(event.request.webhook_url, event.id, lambda: body(event)),
                                      name=f"sam2serve-webhook-{event.id}")
        self._deliveries.add(task)
        task.add_done_callback(self._deliveries.discard)

    async def deliver(self, url: str, job_id: str, payload: Callable[[], dict[str, Any]]) -> str:
        """Deliver one webhook, retrying as the module says; its outcome (delivered, failed, refused)."""
        loop = asyncio.get_running_loop()
        try:
            body = await loop.run_in_executor(None, lambda: json.dumps(payload()).encode())
        except Exception:
            log.exception("webhook for %s: its body could not be made", job_id)
            return self._count("failed")
        attempts = max(1, self._settings.attempts)
        for attempt in range(1, attempts + 1):
            try:
                status = await loop.run_in_executor(None, self._post, url, job_id, body)
            except AddressRefused as e:
                log.warning("webhook for %s refused: %s", job_id, e)
                return self._count("refused")
            except OutboundError as e:
                why, again = str(e), True
            else:
                if 200 <= status < 300:
                    log.info("webhook for %s answered HTTP %d", job_id, status)
                    return self._count("delivered")
                why, again = f"the receiver answered HTTP {status}", retryable(status)
            if not again or attempt == attempts:
                log.warning("webhook for %s not delivered after %d attempt(s): %s", job_id, attempt, why)
                return self._count("failed")
            delay = self._settings.delay(attempt)
            log.info("webhook for %s: attempt %d of %d failed (%s); retrying in %.3g s", job_id, attempt, attempts,
                     why, delay)
            if self._metrics is not None:
                self._metrics.retries.inc()
            await asyncio.sleep(delay)  # the backoff itself: a timer, waiting for nothing else
        raise AssertionError("unreachable: the last attempt returns")

    def _post(self, url: str, job_id: str, body: bytes) -> int:
        headers = {REQUEST_ID_HEADER: job_id}
        if self._settings.secret:
            timestamp = str(int(time.time()))
            headers |= {TIMESTAMP_HEADER: timestamp, SIGNATURE_HEADER: signature(self._settings.secret, timestamp,
                                                                                   body)}
        return post_json(url, body, self._limits, "webhook_url", headers)

    def _count(self, outcome: str) -> str:
        if self._metrics is not None:
            self._metrics.deliveries.labels(outcome).inc()
        return outcome

    async def flush(self, timeout_s: float) -> None:
        """Let deliveries in flight (and their retries) end within `timeout_s`; the rest are abandoned, logged."""
        pending = set(self._deliveries)
        if not pending:
            return
        _, late = await asyncio.wait(pending, timeout=timeout_s)
        for task in late:
            log.warning("webhook %s abandoned: the server is stopping", task.get_name())
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*late, return_exceptions=True)
