"""The gRPC adapter's server: the AutoSegmentService servicer over the app's data plane, with health,
reflection, API keys, TLS and message-size limits."""

from __future__ import annotations

from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from ..app import App
from ..request_fields import RequestLimits
from ..v1 import sam2serve_pb2 as pb
from ..v1 import sam2serve_pb2_grpc as pb_grpc
from .auth import ApiKeyInterceptor
from .convert import server_info
from .servicer import AutoSegmentServicer

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["AutoSegmentService"].full_name


class GrpcAdapter:
    protocol = "grpc"

    def __init__(self, app: App) -> None:
        config = app.config
        self.servicer = AutoSegmentServicer(app.jobs, server_info(app), RequestLimits.of(config),
                                            config.max_message_bytes, app.metrics)
        options = [("grpc.max_send_message_length", config.max_message_bytes),
                   ("grpc.max_receive_message_length", config.max_message_bytes)]
        interceptors = ([ApiKeyInterceptor(config.api_key, app.metrics.rejected.labels("unauthenticated", "grpc").inc)]
                        if config.api_key else [])
        self.server = grpc.aio.server(options=options, interceptors=interceptors)
        pb_grpc.add_AutoSegmentServiceServicer_to_server(self.servicer, self.server)
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
            self.server)
        address = f"{config.host}:{config.port}"
        if config.tls_cert and config.tls_key:
            credentials = grpc.ssl_server_credentials([(Path(config.tls_key).read_bytes(),
                                                        Path(config.tls_cert).read_bytes())])
            self.port = self.server.add_secure_port(address, credentials)
        else:
            self.port = self.server.add_insecure_port(address)

    async def start(self) -> None:
        await self.server.start()

    async def set_serving(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", SERVICE_NAME):
            await self.health.set(name, status)

    async def stop(self, grace_s: float) -> None:
        await self.server.stop(grace=grace_s)
