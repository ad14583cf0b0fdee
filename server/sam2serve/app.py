"""The composition root: engines → generator → pipeline → job store and worker → data plane, with metrics
and webhooks listening for finished jobs; beside it the prompted data plane (embedding cache → segmenter →
workers) on the same engines; then the protocol adapters (gRPC, and fal's HTTP protocol with --http-port) over
them, and the process's life (serving, SIGTERM, drain)."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol
from wsgiref.simple_server import WSGIServer

from . import __version__
from .amg import AutoMaskGenerator
from .config import ServerConfig
from .engines import Engine, Manifest, open_engine
from .engines.contract import encoder_role
from .errors import StartupError
from .jobs import JobFinished, JobService, JobStore, Worker
from .jobs.memory import MemoryJobStore
from .metrics import (
    Metrics,
    create_cache_metrics,
    create_metrics,
    describe_server,
    enable_tenant_metrics,
    observe_job,
    serve_metrics,
)
from .pipeline import SegmentPipeline
from .prompts import ByteBudgetLRU, PromptLimits, PromptSegmenter, PromptWorkers
from .prompts.workers import FetchStage
from .tenants import TenantLabels
from .webhooks import WebhookMetrics, Webhooks

log = logging.getLogger(__name__)
WEBHOOK_FLUSH_S = 5.0  # at shutdown, webhooks in flight (and their retries) get this long to be delivered


@dataclass
class App:
    """Everything a protocol adapter serves from, independent of any protocol."""

    config: ServerConfig
    engine: Engine
    jobs: JobService
    prompts: PromptWorkers
    metrics: Metrics
    webhooks: Webhooks

    @property
    def manifest(self) -> Manifest:
        return self.engine.manifest


async def load_engine(config: ServerConfig) -> Engine:
    """The engines `config` names, opened (and warmed up) off the event loop."""
    loop = asyncio.get_running_loop()
    if config.backend == "tensorrt":
        if config.encoder_precision != "fp32":
            raise StartupError("encoder_precision int8 is an ONNX Runtime variant: the tensorrt backend runs its own "
                               "plans (use --fp16 plans for speed on GPUs)")
        return await loop.run_in_executor(None, lambda: open_engine(str(config.engines), backend="tensorrt"))
    try:
        role = encoder_role(config.encoder_precision)
    except ValueError as e:
        raise StartupError(str(e)) from None
    providers = [p for p in config.providers.split(",") if p] or None
    return await loop.run_in_executor(None, lambda: open_engine(str(config.engines), providers=providers,
                                                                intra_op_threads=config.threads,
                                                                encoder_variant=role))


def make_store(config: ServerConfig, on_finished: Callable[[JobFinished], None]) -> JobStore:
    """The Redis store every replica shares when redis_url is set, else this process's own."""
    if config.redis_url:
        from .jobs.redis import RedisJobStore

        return RedisJobStore(config.redis_url, queue_size=config.queue_size, result_ttl_s=config.result_ttl_seconds,
                             prefix=config.redis_prefix, on_finished=on_finished,
                             queue_bytes=config.queue_image_bytes)
    return MemoryJobStore(queue_size=config.queue_size, result_ttl_s=config.result_ttl_seconds,
                          result_store_bytes=config.result_store_bytes, result_store_jobs=config.result_store_jobs,
                          on_finished=on_finished,
                          queue_bytes=config.queue_image_bytes)


def make_prompts(config: ServerConfig, engine: Engine, metrics: Metrics, fetch_stage: FetchStage | None = None
                 ) -> PromptWorkers:
    """The prompted data plane: a per-replica embedding cache within --embedding-cache-mb, the segmenter on
    `engine`, and its bounded workers (--prompt-workers, up to --queue-size waiting), whose image_url
    downloads run in `fetch_stage` (the job queue's)."""
    budget = config.embedding_cache_mb * 1024 * 1024
    cache: ByteBudgetLRU = ByteBudgetLRU(budget, create_cache_metrics(metrics.registry, budget))
    limits = PromptLimits(max_points=config.max_prompt_points, max_boxes=config.max_prompt_boxes)
    segmenter = PromptSegmenter(engine, cache, config.input_limits(), limits)
    return PromptWorkers(segmenter, workers=config.prompt_workers, max_waiting=config.queue_size,
                         fetch_stage=fetch_stage)


def notify_all(listeners: Sequence[Callable[[JobFinished], None]]) -> Callable[[JobFinished], None]:
    """One `JobFinished` listener that calls each of `listeners`; one failing does not stop the others."""

    def notify(event: JobFinished) -> None:
        for listener in listeners:
            try:
                listener(event)
            except Exception:
                log.exception("a JobFinished listener failed for %s", event.id)

    return notify


async def create_app(config: ServerConfig, engine: Engine | None = None, metrics: Metrics | None = None) -> App:
    """Load (or take) the engines and start the job layer."""
    if engine is None:
        engine = await load_engine(config)
    limits = config.input_limits()
    metrics = metrics or create_metrics()
    from .transport.fal.schema import webhook_body as fal_webhook_body

    settings = config.webhook_settings()
    if not settings.secret:
        log.warning("webhooks are sent unsigned: set --webhook-secret or --webhook-secret-file (SAM2SERVE_WEBHOOK_"
                    "SECRET[_FILE]) so that receivers can check they come from this server")
    webhooks = Webhooks(limits, bodies={"fal": fal_webhook_body},  # fal's body for requests fal's clients made
                        settings=settings, metrics=WebhookMetrics(metrics.webhooks, metrics.webhook_retries))
    listeners: list[Callable[[JobFinished], None]] = [lambda event: observe_job(metrics, event), webhooks]
    keys = config.keys()  # a malformed key entry stops the server here, before anything runs
    if config.tenant_metrics > 0:
        listeners.append(enable_tenant_metrics(metrics, TenantLabels(keys.tenants, config.tenant_metrics)))
    store = make_store(config, notify_all(listeners))
    pipeline = SegmentPipeline(AutoMaskGenerator(engine, max_decoder_batch=config.max_decoder_batch), limits)
    worker = Worker(store, pipeline, workers=config.workers, time_limit_s=config.job_time_limit_seconds,
                    fetchers=config.url_fetchers)
    jobs = JobService(store, worker, config.admission_limits(), max_streams=config.max_status_streams)
    await jobs.start()
    info = engine.info
    describe_server(metrics, __version__, engine.manifest.model, engine.manifest.weights.origin, not info.trained,
                    info.backend, ",".join(info.providers), jobs.depth, info.encoder_precision)
    prompts = make_prompts(config, engine, metrics, worker if config.url_fetchers > 0 else None)
    return App(config, engine, jobs, prompts, metrics, webhooks)


class Adapter(Protocol):
    """A protocol served from an `App` (gRPC, fal's HTTP), on a port of its own."""

    protocol: str  # "grpc", "http": as in the metrics' protocol label
    port: int

    async def start(self) -> None: ...
    async def set_serving(self, serving: bool) -> None: ...
    async def stop(self, grace_s: float) -> None: ...


@dataclass
class RunningServer:
    app: App
    adapters: list[Adapter]
    metrics_port: int | None = None
    _metrics_http: WSGIServer | None = field(default=None, repr=False)
    _stopping: bool = field(default=False, repr=False)
    _health_task: asyncio.Task[None] | None = field(default=None, repr=False)

    @property
    def port(self) -> int:
        """The first adapter's (gRPC's) port."""
        return self.adapters[0].port

    @property
    def http_port(self) -> int | None:
        """fal's HTTP API's port (with --http-port)."""
        return next((a.port for a in self.adapters if a.protocol == "http"), None)

    @property
    def config(self) -> ServerConfig:
        return self.app.config

    async def set_serving(self, serving: bool) -> None:
        for adapter in self.adapters:
            await adapter.set_serving(serving)

    def follow_store(self) -> None:
        """Health follows the job store: NOT_SERVING while its Redis is unreachable (every call would fail),
        SERVING again once it is back, until the server stops."""
        self._health_task = asyncio.create_task(self._follow_store(), name="sam2serve-store-health")

    async def _follow_store(self) -> None:
        store = self.app.jobs.store
        while True:
            reachable = await store.reachability_changed()
            if not self._stopping:
                await self.set_serving(reachable)

    async def shutdown(self) -> bool:
        """Health NOT_SERVING, no new work; queued and running jobs, and prompt calls in flight, finish
        within the drain period."""
        self._stopping = True
        if self._health_task is not None:
            self._health_task.cancel()
            await asyncio.gather(self._health_task, return_exceptions=True)
        await self.set_serving(False)
        self.app.prompts.accepting = False
        drained, prompts_drained = await asyncio.gather(
            self.app.jobs.drain(self.config.drain_seconds, self.config.drain_results_seconds),
            self.app.prompts.drain(self.config.drain_seconds))
        if not drained:
            log.warning("drain period of %.0f s ended with jobs unfinished; they were cancelled",
                        self.config.drain_seconds)
        if not prompts_drained:
            log.warning("drain period of %.0f s ended with prompt calls unfinished; they are cut",
                        self.config.drain_seconds)
        for adapter in self.adapters:
            await adapter.stop(grace_s=5.0)
        await self.app.jobs.close()
        await self.app.webhooks.flush(WEBHOOK_FLUSH_S)
        self.app.prompts.close()
        if self._metrics_http is not None:
            self._metrics_http.shutdown()
            self._metrics_http.server_close()
        return drained


async def start_server(config: ServerConfig, engine: Engine | None = None) -> RunningServer:
    """The app and its adapters, serving on config.host:config.port (metrics on config.metrics_host:
    config.metrics_port). The metrics port is taken first, so that a port in use fails before the engines
    load; StartupError says what to change."""
    from .transport.server import GrpcAdapter

    metrics = create_metrics()
    http = (serve_metrics(metrics, config.metrics_host, config.metrics_port, config.metrics_token)[0]
            if config.metrics_port >= 0 else None)
    try:
        app = await create_app(config, engine, metrics)
        try:
            adapters: list[Adapter] = [GrpcAdapter(app)]
            if config.http_port >= 0:
                from .transport.fal.serve import FalAdapter

                adapters.append(FalAdapter(app))
            running = RunningServer(app, adapters)
        except BaseException:
            await app.jobs.close()
            raise
    except BaseException:
        if http is not None:
            http.shutdown()
            http.server_close()
        raise
    if http is not None:
        running._metrics_http, running.metrics_port = http, http.server_port
    await running.set_serving(False)
    for adapter in running.adapters:
        await adapter.start()
    await running.set_serving(app.jobs.store.reachable)
    running.follow_store()
    log.info("serving %s (%s weights) on %s:%d", app.manifest.model, app.manifest.weights.origin, config.host,
             running.port)
    return running


async def serve_forever(config: ServerConfig) -> int:
    running = await start_server(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"sam2serve listening on {config.host}:{running.port}"
          + (f", fal's HTTP API on :{running.http_port}" if running.http_port is not None else "")
          + (f", metrics on :{running.metrics_port}/metrics" if running.metrics_port else ""), flush=True)
    await stop.wait()
    log.info("shutting down: draining for up to %.0f s", config.drain_seconds)
    await running.shutdown()
    return 0  # an expired drain cancelled what was left (and logged it): still an orderly stop
