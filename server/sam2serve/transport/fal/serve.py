"""fal's HTTP API on uvicorn, in the server's own event loop beside grpc.aio (the job layer's methods are
coroutines on that loop; the CPU-heavy work runs on its worker threads, never on the loop)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Iterator
from dataclasses import dataclass

import uvicorn
from starlette.types import ASGIApp

from ...config import ServerConfig
from ...metrics import Metrics
from ...request_fields import RequestLimits
from ..waiting import WaitingCalls
from .routes import DataPlane, FalApi, FalSettings
from .uploads import MemoryUploads, RedisUploads, Uploads

GRACE_S = 5  # after the drain, what connections still have (streams watching jobs run elsewhere)


class _EmbeddedServer(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        """The host process owns SIGTERM/SIGINT: they start its drain, which stops this server last."""
        yield


@dataclass
class HttpServer:
    port: int
    _server: uvicorn.Server
    _task: asyncio.Task[None]

    async def stop(self) -> None:
        self._server.should_exit = True
        await self._task


async def serve_http(app: ASGIApp, host: str, port: int, tls_cert: str = "", tls_key: str = "") -> HttpServer:
    """Listen on host:port (0: a free port) now, so that calls made from here on wait in the backlog until
    uvicorn accepts them; TLS with the certificate and key files when given."""
    config = uvicorn.Config(app, log_config=None, access_log=False, lifespan="off", ws="none", server_header=False,
                            timeout_graceful_shutdown=GRACE_S, ssl_certfile=tls_cert or None,
                            ssl_keyfile=tls_key or None)
    config.load()  # a bad certificate fails here, at startup, not in a background task
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.create_server((host, port), family=family, backlog=config.backlog)
    server = _EmbeddedServer(config)
    task = asyncio.get_running_loop().create_task(server.serve(sockets=[sock]), name="sam2serve-http")
    return HttpServer(sock.getsockname()[1], server, task)


@dataclass
class FalServer:
    http: HttpServer
    uploads: Uploads

    @property
    def port(self) -> int:
        return self.http.port

    async def stop(self) -> None:
        await self.http.stop()
        await self.uploads.close()


async def start_fal_api(config: ServerConfig, jobs: DataPlane, calls: WaitingCalls, metrics: Metrics,
                        limits: RequestLimits, warning: str) -> FalServer:
    """fal's HTTP API on config.host:config.http_port, over the same job layer as gRPC."""
    uploads: Uploads = (RedisUploads(config.redis_url, config.redis_prefix, config.result_ttl_seconds)
                        if config.redis_url else MemoryUploads(config.result_ttl_seconds, config.result_store_bytes))
    settings = FalSettings(limits, config.max_image_bytes, config.result_ttl_seconds, config.api_key,
                           config.public_url, warning)
    app = FalApi(jobs, calls, uploads, settings, metrics).asgi()
    return FalServer(await serve_http(app, config.host, config.http_port, config.tls_cert, config.tls_key), uploads)
