"""Prometheus metrics. Each server gets its own registry (tests never share global state); names and units
follow Prometheus conventions, and no label carries an unbounded value such as a request id."""

from __future__ import annotations

import hmac
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from socketserver import ThreadingMixIn
from typing import Any, cast
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, make_wsgi_app

from .domain import STAGES
from .errors import StartupError
from .jobs import JobFinished, JobState

# From sub-10 ms GPU stages to multi-minute CPU jobs.
SECONDS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 600.0)
MASK_BUCKETS = (0, 1, 5, 10, 25, 50, 100, 200, 400, 800, 1600)
MEGAPIXEL_BUCKETS = (0.1, 0.25, 0.5, 1, 2, 4, 8, 12, 16, 24, 40)


@dataclass
class Metrics:
    registry: CollectorRegistry
    requests: Counter
    request_seconds: Histogram
    rejected: Counter
    queue_wait_seconds: Histogram
    job_seconds: Histogram
    stage_seconds: Histogram
    masks_per_image: Histogram
    image_megapixels: Histogram
    queue_depth: Gauge
    jobs_in_progress: Gauge
    untrained: Gauge
    build: Info
    webhooks: Counter
    webhook_retries: Counter
    tenant_jobs: Counter | None = None  # with --tenant-metrics only (`enable_tenant_metrics`)


def create_metrics(registry: CollectorRegistry | None = None) -> Metrics:
    r = registry or CollectorRegistry()
    return Metrics(
        registry=r,
        requests=Counter("sam2serve_requests", "Calls by protocol (grpc: rpc and status code; http: fal's route "
                         "as the matching rpc, and the HTTP status)", ["rpc", "code", "protocol"], registry=r),
        request_seconds=Histogram("sam2serve_request_duration_seconds", "Call latency, end to end",
                                  ["rpc", "protocol"], buckets=SECONDS_BUCKETS, registry=r),
        rejected=Counter("sam2serve_rejected_requests", "Requests refused before any work, by reason",
                         ["reason", "protocol"], registry=r),
        queue_wait_seconds=Histogram("sam2serve_queue_wait_seconds", "Time jobs waited in the queue",
                                     buckets=SECONDS_BUCKETS, registry=r),
        job_seconds=Histogram("sam2serve_job_duration_seconds", "Job time from submission to its end, by outcome",
                              ["outcome"], buckets=SECONDS_BUCKETS, registry=r),
        stage_seconds=Histogram("sam2serve_stage_duration_seconds", "Time per pipeline stage of completed jobs",
                                ["stage"], buckets=SECONDS_BUCKETS, registry=r),
        masks_per_image=Histogram("sam2serve_masks_per_image", "Masks returned per completed job",
                                  buckets=MASK_BUCKETS, registry=r),
        image_megapixels=Histogram("sam2serve_image_megapixels", "Size of segmented images in megapixels",
                                   buckets=MEGAPIXEL_BUCKETS, registry=r),
        queue_depth=Gauge("sam2serve_queue_depth", "Jobs waiting in this pod's queue (shared Redis queue: its "
                          "waiting jobs over the live replicas)", registry=r),
        jobs_in_progress=Gauge("sam2serve_jobs_in_progress", "Jobs running now", registry=r),
        untrained=Gauge("sam2serve_untrained_weights", "1 when the served engines have untrained weights "
                        "(meaningless masks)", registry=r),
        build=Info("sam2serve_build", "Version, model, weights origin, execution provider and encoder precision "
                   "(int8-dynamic: the opt-in int8 encoder)", registry=r),
        webhooks=Counter("sam2serve_webhooks", "Webhook deliveries by outcome: delivered, failed (retries spent, "
                         "or refused by the receiver), refused (the address rules)", ["outcome"], registry=r),
        webhook_retries=Counter("sam2serve_webhook_retries", "Webhook calls made again after a connection "
                                "failure, a 5xx or a 429", registry=r),
    )


def describe_server(metrics: Metrics, version: str, model: str, weights: str, untrained: bool, backend: str,
                    provider: str, depth: Callable[[], tuple[float, int]], encoder_precision: str = "fp32") -> None:
    metrics.build.info({"version": version, "model": model, "weights": weights,
                        "untrained": "true" if untrained else "false", "backend": backend, "provider": provider,
                        "encoder_precision": encoder_precision})
    metrics.untrained.set(1 if untrained else 0)
    metrics.queue_depth.set_function(lambda: depth()[0])
    metrics.jobs_in_progress.set_function(lambda: depth()[1])
    for stage in STAGES:  # make every series exist from the start
        metrics.stage_seconds.labels(stage)


class _QuietThreadingServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """Scrapes are not logged."""


def serve_metrics(metrics: Metrics, host: str, port: int, token: str = "") -> tuple[WSGIServer, threading.Thread]:
    """Serve /metrics over HTTP (port 0 picks a free port: server.server_port), to callers that send
    `Authorization: Bearer <token>` when a token is set. StartupError when the port cannot be had."""
    exposition = make_wsgi_app(metrics.registry)
    expected = f"Bearer {token}".encode()

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        given = environ.get("HTTP_AUTHORIZATION", "").encode()
        if token and not hmac.compare_digest(given, expected):
            start_response("401 Unauthorized", [("Content-Type", "text/plain"),
                                                ("WWW-Authenticate", 'Bearer realm="sam2serve metrics"')])
            return [b"metrics need 'Authorization: Bearer <metrics token>'\n"]
        return cast("Iterable[bytes]", exposition(environ, start_response))

    try:
        server = make_server(host, port, app, _QuietThreadingServer, handler_class=_QuietHandler)
    except OSError as e:
        raise StartupError(f"cannot serve metrics on {host}:{port} ({e.strerror or e}); choose another port with "
                           "--metrics-port / SAM2SERVE_METRICS_PORT, or -1 for none") from None
    thread = threading.Thread(target=server.serve_forever, name="sam2serve-metrics", daemon=True)
    thread.start()
    return server, thread


def enable_tenant_metrics(metrics: Metrics, label: Callable[[str], str]) -> Callable[[JobFinished], None]:
    """sam2serve_tenant_jobs_total{tenant,outcome}, and the `JobFinished` listener that counts it; `label` names a
    tenant within a bounded set of values (`tenants.TenantLabels`)."""
    counter = Counter("sam2serve_tenant_jobs", "Jobs ended, by tenant (the first --tenant-metrics tenants of the "
                      "keys; the rest as 'other') and outcome", ["tenant", "outcome"], registry=metrics.registry)
    metrics.tenant_jobs = counter
    return lambda event: counter.labels(label(event.request.tenant), event.state.name.lower()).inc()


def observe_job(metrics: Metrics, event: JobFinished) -> None:
    """Job-level metrics, recorded when a job ends (a `JobFinished` listener)."""
    metrics.job_seconds.labels(event.state.name.lower()).observe(event.finished_at - event.submitted_at)
    if event.started_at is not None:
        metrics.queue_wait_seconds.observe(event.started_at - event.submitted_at)
    if event.state is JobState.COMPLETED and event.outcome is not None:
        for stage, seconds in cast("Mapping[str, float]", event.outcome.timings).items():
            metrics.stage_seconds.labels(stage).observe(seconds)
        metrics.masks_per_image.observe(event.outcome.rendered.mask_count)
        h, w = event.outcome.image_hw
        metrics.image_megapixels.observe(h * w / 1e6)


@dataclass
class CacheMetrics:
    """The prompt service's embedding cache (`prompts.cache.CacheObserver`), by entry kind: "image" (an
    image embedding) or "mask" (the low-res logits a later call can refine)."""

    hits: Counter
    misses: Counter
    evictions: Counter
    bytes: Gauge
    entries: Gauge
    budget: Gauge

    def hit(self, kind: str) -> None:
        self.hits.labels(kind).inc()

    def miss(self, kind: str) -> None:
        self.misses.labels(kind).inc()

    def evicted(self, kind: str) -> None:
        self.evictions.labels(kind).inc()

    def size(self, kind: str, entries: int, nbytes: int) -> None:
        self.entries.labels(kind).set(entries)
        self.bytes.labels(kind).set(nbytes)


def create_cache_metrics(registry: CollectorRegistry, budget_bytes: int) -> CacheMetrics:
    r = registry
    metrics = CacheMetrics(
        hits=Counter("sam2serve_embedding_cache_hits", "Cache lookups that found the entry, by kind", ["kind"],
                     registry=r),
        misses=Counter("sam2serve_embedding_cache_misses", "Cache lookups that did not, by kind", ["kind"],
                       registry=r),
        evictions=Counter("sam2serve_embedding_cache_evictions", "Entries evicted to stay within the budget, by "
                          "kind", ["kind"], registry=r),
        bytes=Gauge("sam2serve_embedding_cache_bytes", "Bytes held in the cache, by kind", ["kind"], registry=r),
        entries=Gauge("sam2serve_embedding_cache_entries", "Entries in the cache, by kind", ["kind"], registry=r),
        budget=Gauge("sam2serve_embedding_cache_budget_bytes", "The cache's byte budget (--embedding-cache-mb)",
                     registry=r),
    )
    metrics.budget.set(budget_bytes)
    for kind in ("image", "mask"):  # make every series exist from the start
        for family in (metrics.hits, metrics.misses, metrics.evictions, metrics.bytes, metrics.entries):
            family.labels(kind)
    return metrics
