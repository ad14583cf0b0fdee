"""fal's HTTP API as an adapter of the app (`app.Adapter`): Starlette on uvicorn, in the server's own event
loop beside grpc.aio (the data plane's methods are coroutines on that loop; the CPU-heavy work runs on the
worker's threads, never on the loop)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Iterator

import uvicorn

from ...app import App
from ...engines.base import UNTRAINED_WARNING
from ...request_fields import RequestLimits
from .routes import FalApi, FalSettings
from .uploads import MemoryUploads, RedisUploads, Uploads


class _EmbeddedServer(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        """The host process owns SIGTERM/SIGINT: they start its drain, which stops this server last."""
        yield


class FalAdapter:
    protocol = "http"

    def __init__(self, app: App) -> None:
        config = app.config
        self.uploads: Uploads = (
            RedisUploads(config.redis_url, config.redis_prefix, config.result_ttl_seconds, config.result_store_bytes)
            if config.redis_url
            else MemoryUploads(config.result_ttl_seconds, config.result_store_bytes))
        settings = FalSettings(RequestLimits.of(config), config.max_image_bytes, config.result_ttl_seconds,
                               config.keys(), config.public_url,
                               "" if app.engine.info.trained else UNTRAINED_WARNING)
        asgi = FalApi(app.jobs, app.prompts, self.uploads, settings, app.metrics).asgi()
        self._config = uvicorn.Config(asgi, log_config=None, access_log=False, lifespan="off", ws="none",
                                      server_header=False, ssl_certfile=config.tls_cert or None,
                                      ssl_keyfile=config.tls_key or None,
                                      # gRPC's bound on calls in progress, here on connections (idle keep-alive
                                      # ones too) and requests in progress: beyond it uvicorn answers 503
                                      limit_concurrency=config.max_concurrent_rpcs or None)
        self._config.load()  # a bad certificate fails here, at startup
        # Listening from now on: calls made before uvicorn accepts them wait in the backlog.
        family = socket.AF_INET6 if ":" in config.host else socket.AF_INET
        self._socket = socket.create_server((config.host, config.http_port), family=family,
                                            backlog=self._config.backlog)
        self.port: int = self._socket.getsockname()[1]
        self._server = _EmbeddedServer(self._config)
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._server.serve(sockets=[self._socket]),
                                                            name="sam2serve-http")

    async def set_serving(self, serving: bool) -> None:
        """Nothing to flip: probes ask gRPC's health service; a draining data plane refuses new jobs (503)."""

    async def stop(self, grace_s: float) -> None:
        """After the drain: connections still open (streams of jobs run elsewhere) get `grace_s`."""
        self._config.timeout_graceful_shutdown = max(1, round(grace_s))
        self._server.should_exit = True
        if self._task is not None:
            await self._task
        await self.uploads.close()
