"""Webhooks: when a queued job ends, POST {request_id, status[, error]} (or the body of the protocol that took
the request, e.g. fal's) to the URL its request named, under image_url's address rules, off the event loop
(the body too: fal's may hold every mask), best effort (failures are logged)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from typing import Any

from .errors import public_message
from .jobs import JobFinished
from .limits import InputLimits
from .outbound import OutboundError, post_json

log = logging.getLogger(__name__)


Body = Callable[[JobFinished], dict[str, Any]]


def default_body(event: JobFinished) -> dict[str, Any]:
    payload = {"request_id": event.id, "status": event.state.name}
    if event.error is not None:
        payload["error"] = public_message(event.error)
    return payload


class Webhooks:
    """A `JobFinished` listener. `bodies`: the body for requests whose `delivery["protocol"]` names one."""

    def __init__(self, limits: InputLimits, bodies: Mapping[str, Body] | None = None) -> None:
        self._limits = limits
        self._bodies = dict(bodies or {})
        self._loop = asyncio.get_running_loop()

    def __call__(self, event: JobFinished) -> None:
        if not event.request.webhook_url:
            return
        body = self._bodies.get(event.request.delivery.get("protocol", ""), default_body)
        self._loop.run_in_executor(None, self.call, event.request.webhook_url, event.id, lambda: body(event))

    def call(self, url: str, job_id: str, payload: Callable[[], dict[str, Any]]) -> None:
        try:
            status = post_json(url, payload(), self._limits, field="webhook_url")
            log.info("webhook for %s answered HTTP %d", job_id, status)
        except OutboundError as e:
            log.warning("webhook for %s not delivered: %s", job_id, e)
