"""Server configuration: flags, else SAM2SERVE_* environment variables, else defaults."""

from __future__ import annotations

import argparse
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .limits import DEFAULT_MAX_DECODER_PROMPTS, AdmissionLimits, InputLimits

if TYPE_CHECKING:
    from .tenants import ApiKeys
    from .webhooks import WebhookSettings

SECRETS = ("api_key", "api_keys", "metrics_token", "webhook_secret")  # shown as *** when the configuration is printed


@dataclass(frozen=True)
class ServerConfig:
    engines: Path = Path("engines/sam2.1_hiera_tiny")
    host: str = "0.0.0.0"
    port: int = 50051
    metrics_port: int = 9090  # -1 disables the metrics endpoint; 0 picks a free port
    # The metrics endpoint's address: this host only unless set (a pod's Prometheus needs 0.0.0.0; the chart
    # sets it), and, when metrics_token is set, only for `Authorization: Bearer <metrics_token>`.
    metrics_host: str = "127.0.0.1"
    metrics_token: str = ""
    http_port: int = -1  # fal's HTTP API (queue, synchronous run, status streams); -1 disables it, 0: a free port
    public_url: str = ""  # base of the URLs the HTTP API hands out, behind a load balancer ("": the URL called)
    workers: int = 1  # jobs run at once (each uses every core through ONNX Runtime)
    url_fetchers: int = 4  # image_url downloads at once, apart from the workers; 0: a worker fetches its own
    queue_size: int = 32  # jobs waiting; beyond that RESOURCE_EXHAUSTED
    queue_image_bytes: int = 256 * 1024 * 1024  # images held by waiting jobs (all replicas, with Redis); 0: none
    backend: str = "onnx"  # onnx (ONNX Runtime) or tensorrt (plans built by `sam2serve export trt`)
    providers: str = ""  # comma-separated onnxruntime providers; empty: best available
    # fp32: Meta's masks. int8: the opt-in encoder_int8 variant (`export --int8-encoder`, ONNX Runtime only): the
    # encoder ~25 % faster on CPUs, masks slightly different; GetInfo, every response and the metrics say so.
    encoder_precision: str = "fp32"
    threads: int = 0  # onnxruntime intra-op threads; 0: all cores
    max_decoder_batch: int = 8  # prompts per decoder run; ≈ 80 MB each in ORT on CPU
    max_message_bytes: int = 64 * 1024 * 1024
    max_concurrent_rpcs: int = 8192  # calls in progress (gRPC: RESOURCE_EXHAUSTED), HTTP connections (503)
    max_status_streams: int = 4096  # WatchStatus / Subscribe streams open at once; beyond that RESOURCE_EXHAUSTED
    result_ttl_seconds: float = 600.0
    result_store_bytes: int = 512 * 1024 * 1024  # in-process queue only; Redis has its own maxmemory
    result_store_jobs: int = 10_000  # finished jobs kept, in-process queue only; the oldest go first
    redis_url: str = ""  # redis://[:password@]host:port/db: a queue shared by every replica; empty: in-process
    redis_prefix: str = "sam2serve:"  # key prefix, so that several deployments can share one Redis
    drain_seconds: float = 30.0
    drain_results_seconds: float = 10.0  # in-process queue: after the drain's last job, results stay fetchable
    api_key: str = ""  # a key of the default tenant; with api_keys and api_keys_file all empty: no authentication
    api_keys: str = ""  # "tenant:key,tenant:key": keys of named tenants, each seeing only its own requests
    api_keys_file: str = ""  # one tenant:key per line (# comments)
    tenant_metrics: int = 0  # per-tenant job metrics for the first N tenants of the keys (the rest: 'other'); 0: off
    tls_cert: str = ""
    tls_key: str = ""
    max_points_per_side: int = 64
    embedding_cache_mb: int = 512  # PromptSegmentService: embeddings (≈ 62 MB each, decoder context in) + logits
    prompt_workers: int = 2  # PromptSegmentService calls run at once (more wait, up to queue_size)
    max_prompt_points: int = 64
    max_prompt_boxes: int = 16  # each box is one more prompt set in the decoder batch
    max_crop_n_layers: int = 3
    # The work one request may ask for (decoder prompts: grid × crops, more with use_m2m), refused at Submit,
    # and the time one job may run (then FAILED, DEADLINE_EXCEEDED; its fetch and compute, not its waits for
    # the queue or a free worker); 0 for no time limit.
    max_decoder_prompts: int = DEFAULT_MAX_DECODER_PROMPTS
    job_time_limit_seconds: float = 1800.0
    max_image_bytes: int = 20 * 1024 * 1024
    max_image_pixels: int = 40_000_000
    allow_private_urls: bool = False
    # Webhooks: signed with HMAC-SHA256 under this secret (or the contents of webhook_secret_file; neither:
    # unsigned, with a warning at startup); calls in all when the receiver is unreachable or answers 5xx/429,
    # and the first wait between them (doubled each time, at most 60 s).
    webhook_secret: str = ""
    webhook_secret_file: str = ""
    webhook_attempts: int = 4
    webhook_backoff_seconds: float = 1.0
    log_level: str = "INFO"

    def input_limits(self) -> InputLimits:
        return InputLimits(max_image_bytes=self.max_image_bytes, max_pixels=self.max_image_pixels,
                           allow_private_networks=self.allow_private_urls)

    def admission_limits(self) -> AdmissionLimits:
        return AdmissionLimits(max_decoder_prompts=self.max_decoder_prompts, max_image_bytes=self.max_image_bytes,
                               outbound=self.input_limits())

    def webhook_settings(self) -> WebhookSettings:
        """The webhook settings; StartupError when webhook_secret_file cannot be read or is empty."""
        from .errors import StartupError
        from .webhooks import WebhookSettings

        secret = self.webhook_secret.encode()
        if self.webhook_secret_file:
            try:
                secret = Path(self.webhook_secret_file).read_bytes().strip()
            except OSError as e:
                raise StartupError(f"webhook_secret_file {self.webhook_secret_file!r} cannot be read: "
                                   f"{e.strerror}") from None
            if not secret:
                raise StartupError(f"webhook_secret_file {self.webhook_secret_file!r} is empty")
        if self.webhook_attempts < 1 or self.webhook_backoff_seconds < 0:
            raise StartupError("webhook_attempts must be at least 1 and webhook_backoff_seconds at least 0")
        return WebhookSettings(secret=secret, attempts=self.webhook_attempts, backoff_s=self.webhook_backoff_seconds)

    def keys(self) -> ApiKeys:
        """The API keys and their tenants (`tenants`); StartupError for a malformed entry or file."""
        from .tenants import api_keys

        return api_keys(self.api_key, self.api_keys, self.api_keys_file)

    def describe(self) -> str:
        shown = {k: ("***" if k in SECRETS and v else str(v)) for k, v in asdict(self).items()}
        shown["redis_url"] = without_password(self.redis_url)
        return ", ".join(f"{k}={v}" for k, v in shown.items())


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    for f in fields(ServerConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.type in ("bool", bool):
            parser.add_argument(flag, action="store_true", default=None, help=f"env SAM2SERVE_{f.name.upper()}")
        else:
            parser.add_argument(flag, default=None, help=f"env SAM2SERVE_{f.name.upper()} (default {f.default})")


def config_from(args: argparse.Namespace, environ: dict[str, str] | None = None) -> ServerConfig:
    env = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for f in fields(ServerConfig):
        raw = getattr(args, f.name, None)
        if raw is None:
            raw = env.get(f"SAM2SERVE_{f.name.upper()}")
        if raw is None:
            continue
        kind: type[Any] = type(f.default)
        if kind is bool:
            values[f.name] = raw if isinstance(raw, bool) else raw.strip().lower() in ("1", "true", "yes", "on")
        else:
            try:
                values[f.name] = kind(raw)
            except ValueError:
                raise SystemExit(f"error: {f.name} must be a {kind.__name__}, got {raw!r}") from None
    return ServerConfig(**values)


def without_password(url: str) -> str:
    """A URL fit for logs: the password (in the authority or as ?password=) replaced by ***."""
    from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

    parts = urlsplit(url)
    if parts.password:
        netloc = f"{parts.username or ''}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
        parts = parts._replace(netloc=netloc)
    query = parse_qsl(parts.query, keep_blank_values=True)
    if any(k.lower() == "password" for k, _ in query):
        parts = parts._replace(query=urlencode([(k, "***" if k.lower() == "password" else v) for k, v in query]))
    return urlunsplit(parts)
