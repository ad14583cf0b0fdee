"""The gRPC server: engines → generator → job queue → servicer, with health, reflection, auth, TLS,
message-size limits and a graceful drain on SIGTERM."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from ..amg import AutoMaskGenerator
from ..amg.params import fal_defaults
from ..config import ServerConfig
from ..engines import open_engine
from ..errors import ImageFetchError
from ..grpc_status import status_for
from ..inputs import InputLimits
from ..inputs.fetch import post_json
from ..jobs import InProcessJobQueue, Job, JobQueue, JobState, Runner
from ..metrics import Metrics, create_metrics, describe_server, serve_metrics
from ..pipeline import run_segment
from ..prompts import PromptWorkers
from ..v1 import sam2serve_pb2 as pb
from ..v1 import sam2serve_pb2_grpc as pb_grpc
from .auth import ApiKeyInterceptor
from .convert import RequestLimits, generator_defaults
from .prompt_servicer import attach_prompt_service
from .servicer import AutoSegmentServicer, server_info

log = logging.getLogger(__name__)
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["AutoSegmentService"].full_name
PROMPT_SERVICE_NAME = pb.DESCRIPTOR.services_by_name["PromptSegmentService"].full_name


@dataclass
class RunningServer:
    server: grpc.aio.Server
    port: int
    health: health.aio.HealthServicer
    queue: JobQueue
    servicer: AutoSegmentServicer
    config: ServerConfig
    metrics: Metrics
    metrics_port: int | None = None
    _metrics_http: object | None = None
    prompts: PromptWorkers | None = None

    async def set_serving(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", SERVICE_NAME, PROMPT_SERVICE_NAME):
            await self.health.set(name, status)

    async def shutdown(self) -> bool:
        """Health NOT_SERVING, no new work, queued and running jobs finish within the drain period."""
        await self.set_serving(False)
        if self.prompts is not None:
            self.prompts.accepting = False
        deadline = asyncio.get_running_loop().time() + self.config.drain_seconds
        drained = await self.queue.drain(self.config.drain_seconds)
        # Calls waiting for jobs that other replicas run (shared queue) get the rest of the drain period.
        remaining = max(0.0, deadline - asyncio.get_running_loop().time())
        drained = await self.servicer.wait_for_waiting_calls(remaining) and drained
        # Calls cut from here on leave their jobs to the replicas that run them; in-process jobs stop with them.
        self.servicer.stopping = self.queue.shared
        if not drained:
            log.warning("drain period of %.0f s ended with jobs unfinished", self.config.drain_seconds)
        await self.server.stop(grace=5.0)
        await self.queue.close()
        if self.prompts is not None:
            self.prompts.close()
        if self._metrics_http is not None:
            self._metrics_http.shutdown()  # type: ignore[attr-defined]
        return drained


async def start_server(config: ServerConfig, engine: object | None = None) -> RunningServer:
    """Load (or take) the engines, warm them, and start serving on config.host:config.port."""
    loop = asyncio.get_running_loop()
    if engine is None:
        if config.backend == "tensorrt":
            engine = await loop.run_in_executor(None, lambda: open_engine(str(config.engines), backend="tensorrt"))
        else:
            providers = [p for p in config.providers.split(",") if p] or None
            engine = await loop.run_in_executor(None, lambda: open_engine(
                str(config.engines), providers=providers, intra_op_threads=config.threads))
    manifest = engine.manifest  # type: ignore[attr-defined]
    if not manifest.weights.trained:
        log.warning("UNTRAINED WEIGHTS: serving randomly initialised %s engines; masks are meaningless",
                    manifest.model)
    generator = AutoMaskGenerator(engine, max_decoder_batch=config.max_decoder_batch)  # type: ignore[arg-type]
    input_limits = config.input_limits()

    def runner(request, should_stop, on_progress, log_line):
        return run_segment(request, generator, input_limits, should_stop, on_progress, log_line)

    metrics = create_metrics()
    queue = make_queue(config, runner, on_finished=lambda job: job_finished(job, metrics, input_limits, loop))
    await queue.start()
    limits = RequestLimits(max_points_per_side=config.max_points_per_side, max_crop_n_layers=config.max_crop_n_layers)
    info = server_info(
        manifest, list(getattr(engine, "active_providers", engine.providers)),  # type: ignore[attr-defined]
        "tensorrt" if type(engine).__name__ == "TensorRTEngine" else "onnxruntime",
        pb.Limits(max_image_bytes=config.max_image_bytes, max_image_pixels=config.max_image_pixels,
                  max_points_per_side=config.max_points_per_side, max_crop_n_layers=config.max_crop_n_layers,
                  queue_size=config.queue_size, workers=config.workers, max_message_bytes=config.max_message_bytes,
                  result_ttl_seconds=config.result_ttl_seconds, max_prompt_points=config.max_prompt_points,
                  max_prompt_boxes=config.max_prompt_boxes,
                  embedding_cache_bytes=config.embedding_cache_mb * 1024 * 1024),
        generator_defaults(fal_defaults()),
    )
    servicer = AutoSegmentServicer(queue, info, limits, config.max_message_bytes, metrics)
    describe_server(metrics, info.version, manifest.model, manifest.weights.origin, info.model.untrained,
                    info.model.backend, ",".join(info.model.providers), queue.depth)
    options = [("grpc.max_send_message_length", config.max_message_bytes),
               ("grpc.max_receive_message_length", config.max_message_bytes)]
    interceptors = ([ApiKeyInterceptor(config.api_key, metrics.rejected.labels("unauthenticated").inc)]
                    if config.api_key else [])
    server = grpc.aio.server(options=options, interceptors=interceptors)
    pb_grpc.add_AutoSegmentServiceServicer_to_server(servicer, server)
    prompts = attach_prompt_service(server, config, engine, metrics, info.model)  # type: ignore[arg-type]
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, PROMPT_SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
         reflection.SERVICE_NAME), server)
    address = f"{config.host}:{config.port}"
    if config.tls_cert and config.tls_key:
        credentials = grpc.ssl_server_credentials([(Path(config.tls_key).read_bytes(),
                                                    Path(config.tls_cert).read_bytes())])
        port = server.add_secure_port(address, credentials)
    else:
        port = server.add_insecure_port(address)
    running = RunningServer(server, port, health_servicer, queue, servicer, config, metrics, prompts=prompts)
    if config.metrics_port >= 0:
        http, _ = serve_metrics(metrics, config.host, config.metrics_port)
        running._metrics_http, running.metrics_port = http, http.server_port
    await running.set_serving(False)
    await server.start()
    await running.set_serving(True)
    log.info("serving %s (%s weights) on %s:%d", manifest.model, manifest.weights.origin, config.host, port)
    return running


def make_queue(config: ServerConfig, runner: Runner, on_finished: Callable[[Job], None]) -> JobQueue:
    """The shared Redis queue when redis_url is set, else the in-process one."""
    if config.redis_url:
        from ..redis_jobs import RedisJobQueue

        return RedisJobQueue(runner, config.redis_url, workers=config.workers, queue_size=config.queue_size,
                             result_ttl_s=config.result_ttl_seconds, prefix=config.redis_prefix,
                             on_finished=on_finished)
    return InProcessJobQueue(runner, workers=config.workers, queue_size=config.queue_size,
                             result_ttl_s=config.result_ttl_seconds, result_store_bytes=config.result_store_bytes,
                             on_finished=on_finished)


def job_finished(job: Job, metrics: Metrics, limits: InputLimits, loop: asyncio.AbstractEventLoop) -> None:
    observe_job(metrics, job)
    if job.request.webhook_url:
        payload = {"request_id": job.id, "status": job.state.name}
        if job.error is not None:
            payload["error"] = status_for(job.error)[1]
        loop.run_in_executor(None, call_webhook, job.request.webhook_url, payload, limits)


def call_webhook(url: str, payload: dict, limits: InputLimits) -> None:
    """Best effort, off the event loop, under image_url's address rules; failures are logged."""
    try:
        status = post_json(url, payload, limits)
        log.info("webhook for %s answered HTTP %d", payload["request_id"], status)
    except ImageFetchError as e:
        log.warning("webhook for %s not delivered: %s", payload["request_id"], e)


def observe_job(metrics: Metrics, job: Job) -> None:
    """Job-level metrics, recorded when a job ends."""
    end = job.finished_at or job.submitted_at
    metrics.job_seconds.labels(job.state.name.lower()).observe(end - job.submitted_at)
    if job.started_at is not None:
        metrics.queue_wait_seconds.observe(job.started_at - job.submitted_at)
    if job.state is JobState.COMPLETED and job.outcome is not None:
        for stage, seconds in job.outcome.timings.items():
            metrics.stage_seconds.labels(stage).observe(seconds)
        metrics.masks_per_image.observe(job.outcome.rendered.mask_count)
        h, w = job.outcome.image_hw
        metrics.image_megapixels.observe(h * w / 1e6)


async def serve_forever(config: ServerConfig) -> int:
    running = await start_server(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"sam2serve listening on {config.host}:{running.port}"
          + (f", metrics on :{running.metrics_port}/metrics" if running.metrics_port else ""), flush=True)
    await stop.wait()
    log.info("shutting down: draining for up to %.0f s", config.drain_seconds)
    drained = await running.shutdown()
    return 0 if drained else 1
