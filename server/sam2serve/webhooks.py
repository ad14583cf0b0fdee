"""Webhooks: when a queued job ends, POST {request_id, status[, error]} to the URL its request named, under
image_url's address rules, off the event loop, best effort (failures are logged)."""

from __future__ import annotations

import asyncio
import logging

from .errors import public_message
from .jobs import JobFinished
from .limits import InputLimits
from .outbound import OutboundError, post_json

log = logging.getLogger(__name__)


class Webhooks:
    """A `JobFinished` listener."""

    def __init__(self, limits: InputLimits) -> None:
        self._limits = limits
        self._loop = asyncio.get_running_loop()

    def __call__(self, event: JobFinished) -> None:
        if not event.request.webhook_url:
            return
        payload = {"request_id": event.id, "status": event.state.name}
        if event.error is not None:
            payload["error"] = public_message(event.error)
        self._loop.run_in_executor(None, self.call, event.request.webhook_url, payload)

    def call(self, url: str, payload: dict[str, str]) -> None:
        try:
            status = post_json(url, payload, self._limits, field="webhook_url")
            log.info("webhook for %s answered HTTP %d", payload["request_id"], status)
        except OutboundError as e:
            log.warning("webhook for %s not delivered: %s", payload["request_id"], e)
