"""The gRPC adapter's server: the AutoSegmentService and PromptSegmentService servicers over the app's data
planes, with health, reflection, API keys, TLS and message-size limits."""

from __future__ import annotations

from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from ..app import App
from ..errors import StartupError
from ..request_fields import RequestLimits
from ..v1 import sam2serve_pb2 as pb
from ..v1 import sam2serve_pb2_grpc as pb_grpc
from .auth import ApiKeyInterceptor
from .convert import server_info
from .prompt_servicer import PromptSegmentServicer
from .servicer import AutoSegmentServicer
from .wire import UndecodableRequests

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["AutoSegmentService"].full_name
PROMPT_SERVICE_NAME = pb.DESCRIPTOR.services_by_name["PromptSegmentService"].full_name
REQUEST_SLACK_BYTES = 64 * 1024  # a request's fields besides its image, and a data URI's header


def receive_limit(max_message_bytes: int, max_image_bytes: int) -> int:
    """The largest request gRPC receives: one carrying the largest image we accept, in its largest form (a
    base64 data URI), never more than the message limit. Larger ones are refused by gRPC (RESOURCE_EXHAUSTED)
    before they are parsed, so a 60 MiB message to a server with a 20 MiB image cap is never held as one."""
    return min(max_message_bytes, -(-max_image_bytes // 3) * 4 + REQUEST_SLACK_BYTES)


def pending_call_limits(max_concurrent_rpcs: int) -> list[tuple[str, int]]:
    """gRPC core's bounds on calls that arrived but that the Python server has not yet taken up. Its defaults
    (1 000, then random refusals up to 3 000) cut calls with a bare CANCELLED and no message when a burst
    arrives faster than the event loop takes them (e.g. 4 000 status streams opened at once, under the
    4 096-stream bound); tied to --max-concurrent-rpcs, whose refusal is RESOURCE_EXHAUSTED with a message."""
    if not max_concurrent_rpcs:
        return []
    return [("grpc.server.max_pending_requests", max_concurrent_rpcs),
            ("grpc.server.max_pending_requests_hard_limit", max_concurrent_rpcs)]


class GrpcAdapter:
    protocol = "grpc"

    def __init__(self, app: App) -> None:
        config = app.config
        info = server_info(app)
        keys = config.keys()
        self.servicer = AutoSegmentServicer(app.jobs, info, RequestLimits.of(config), config.max_message_bytes,
                                            app.metrics, keys)
        self.prompt_servicer = PromptSegmentServicer(app.prompts, info.model, config.max_message_bytes, app.metrics)
        options = [("grpc.max_send_message_length", config.max_message_bytes),
                   ("grpc.max_receive_message_length", receive_limit(config.max_message_bytes,
                                                                     config.max_image_bytes)),
                   ("grpc.so_reuseport", 0),  # a second server on a port in use fails instead of sharing it
                   *pending_call_limits(config.max_concurrent_rpcs)]
        interceptors: list[grpc.aio.ServerInterceptor] = (
            [ApiKeyInterceptor(keys, app.metrics.rejected.labels("unauthenticated", "grpc").inc)]
            if keys.required else [])
        interceptors.append(UndecodableRequests(app.metrics.rejected.labels("invalid_argument", "grpc").inc))
        self.server = grpc.aio.server(options=options, interceptors=interceptors,
                                      maximum_concurrent_rpcs=config.max_concurrent_rpcs or None)
        pb_grpc.add_AutoSegmentServiceServicer_to_server(self.servicer, self.server)
        pb_grpc.add_PromptSegmentServiceServicer_to_server(self.prompt_servicer, self.server)
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, PROMPT_SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
             reflection.SERVICE_NAME), self.server)
        address = f"{config.host}:{config.port}"
        try:
            if config.tls_cert and config.tls_key:
                credentials = grpc.ssl_server_credentials([(Path(config.tls_key).read_bytes(),
                                                            Path(config.tls_cert).read_bytes())])
                self.port = self.server.add_secure_port(address, credentials)
            else:
                self.port = self.server.add_insecure_port(address)
        except RuntimeError:  # gRPC's "Failed to bind to address ..."
            raise StartupError(f"cannot listen on {address} for gRPC (in use, or not an address of this host); "
                               "choose another with --port / SAM2SERVE_PORT") from None

    async def start(self) -> None:
        await self.server.start()

    async def set_serving(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", SERVICE_NAME, PROMPT_SERVICE_NAME):
            await self.health.set(name, status)

    async def stop(self, grace_s: float) -> None:
        await self.server.stop(grace=grace_s)
