"""Prometheus metrics. Each server gets its own registry (tests never share global state); names and units
follow Prometheus conventions, and no label carries an unbounded value such as a request id."""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import cast
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, start_http_server

from .domain import STAGES
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
        build=Info("sam2serve_build", "Version, model, weights origin and execution provider", registry=r),
    )


def describe_server(metrics: Metrics, version: str, model: str, weights: str, untrained: bool, backend: str,
                    provider: str, depth: Callable[[], tuple[float, int]]) -> None:
    metrics.build.info({"version": version, "model": model, "weights": weights,
                        "untrained": "true" if untrained else "false", "backend": backend, "provider": provider})
    metrics.untrained.set(1 if untrained else 0)
    metrics.queue_depth.set_function(lambda: depth()[0])
    metrics.jobs_in_progress.set_function(lambda: depth()[1])
    for stage in STAGES:  # make every series exist from the start
        metrics.stage_seconds.labels(stage)


def serve_metrics(metrics: Metrics, host: str, port: int) -> tuple[WSGIServer, threading.Thread]:
    """Serve /metrics over HTTP; port 0 picks a free port (server.server_port)."""
    return start_http_server(port, addr=host, registry=metrics.registry)


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
