"""Webhooks at the job layer (fake compute, a real receiver on loopback, allowed explicitly): signed so that the
README's verification snippet accepts them, retried on connection failures, 5xx and 429 but not 4xx, counted,
never changing the job's result; and with two replicas on one redis-server, sent once per finished job."""

from __future__ import annotations

import asyncio
import json
import re
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from conftest import needs_export_tools, needs_redis
from jobfakes import OneStage, outcome, request
from sam2serve.jobs import JobService, JobState, JobStore, Worker
from sam2serve.jobs.memory import MemoryJobStore
from sam2serve.limits import AdmissionLimits, InputLimits
from sam2serve.metrics import Metrics, create_metrics
from sam2serve.webhooks import (
    REQUEST_ID_HEADER,
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    WebhookMetrics,
    Webhooks,
    WebhookSettings,
    signature,
)

README = Path(__file__).resolve().parents[1] / "README.md"
LOOPBACK = InputLimits(allow_private_networks=True)  # the receiver listens on 127.0.0.1
SECRET = b"whsec-test-0123456789"


def readme_verifier() -> Callable[..., bool]:
    """`verify_webhook` as the README shows it, executed from the README's text."""
    text = README.read_text()
    found = re.search(r"<!-- webhook-verification -->\n```python\n(.*?)```", text, re.S)
    assert found, "the README's webhook verification snippet is missing"
    namespace: dict[str, Any] = {}
    exec(compile(found.group(1), "README.md", "exec"), namespace)
    return namespace["verify_webhook"]


class Receiver:
    """Records every POST (headers, raw body) and answers the statuses of `answers` in turn, then 200."""

    def __init__(self, answers: tuple[int, ...] = ()) -> None:
        self.calls: list[tuple[Any, bytes]] = []
        self._answers = list(answers)
        self._changed = threading.Condition()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                with receiver._changed:
                    status = receiver._answers.pop(0) if receiver._answers else 200
                    receiver.calls.append((self.headers, body))
                    receiver._changed.notify_all()
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/hook"

    def ids(self) -> list[str]:
        with self._changed:
            return [json.loads(body)["request_id"] for _, body in self.calls]

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


def webhooks(metrics: Metrics, limits: InputLimits = LOOPBACK, **settings: Any) -> Webhooks:
    """Call on the event loop."""
    return Webhooks(limits, settings=WebhookSettings(**{"backoff_s": 0.01, **settings}),
                    metrics=WebhookMetrics(metrics.webhooks, metrics.webhook_retries))


def count(metrics: Metrics, outcome_name: str) -> float:
    return metrics.registry.get_sample_value("sam2serve_webhooks_total", {"outcome": outcome_name}) or 0.0


def retries(metrics: Metrics) -> float:
    return metrics.registry.get_sample_value("sam2serve_webhook_retries_total") or 0.0


def queue(store: JobStore, workers: int = 1) -> JobService:
    return JobService(store, Worker(store, OneStage(lambda *a: outcome()), workers=workers),
                      AdmissionLimits(outbound=LOOPBACK))


def test_a_job_s_webhook_is_signed_and_the_readme_snippet_verifies_it(receiver):
    verify = readme_verifier()
    metrics = create_metrics()

    async def main() -> str:
        hooks = webhooks(metrics, secret=SECRET)
        jobs = queue(MemoryJobStore(on_finished=hooks))
        await jobs.start()
        try:
            job = await jobs.submit(request(webhook_url=receiver.url))
            await jobs.wait(job.id)
            await hooks.flush(60)
            return job.id
        finally:
            await jobs.close()

    job_id = asyncio.run(main())
    [(headers, body)] = receiver.calls
    assert json.loads(body) == {"request_id": job_id, "status": "COMPLETED"}
    assert headers[REQUEST_ID_HEADER] == job_id
    assert verify(SECRET, headers, body)
    assert not verify(b"another secret", headers, body)
    assert not verify(SECRET, headers, body.replace(b"COMPLETED", b"FAILED"))
    old = str(int(time.time()) - 3600)  # a replayed webhook, signed properly an hour ago
    replayed = {TIMESTAMP_HEADER: old, SIGNATURE_HEADER: signature(SECRET, old, body)}
    assert not verify(SECRET, replayed, body)
    assert verify(SECRET, replayed, body, tolerance_s=7200)
    assert count(metrics, "delivered") == 1


def test_without_a_secret_webhooks_carry_no_signature(receiver):
    metrics = create_metrics()

    async def main() -> str:
        return await webhooks(metrics).deliver(receiver.url, "a" * 32, lambda: {"request_id": "a" * 32})

    assert asyncio.run(main()) == "delivered"
    [(headers, _)] = receiver.calls
    assert headers[REQUEST_ID_HEADER] == "a" * 32
    assert headers.get(SIGNATURE_HEADER) is None and headers.get(TIMESTAMP_HEADER) is None


@pytest.mark.parametrize(("answers", "attempts", "expected", "calls"), [
    ((503, 429, 502), 4, "delivered", 4),  # 5xx and 429 are retried, then it answers 200
    ((500, 500, 500), 3, "failed", 3),  # retries spent: exactly `attempts` calls
    ((400,), 4, "failed", 1),  # a 4xx is the receiver's refusal: not retried
    ((404,), 4, "failed", 1),
])
def test_retries_on_5xx_and_429_not_on_4xx_and_bounded(answers, attempts, expected, calls):
    metrics = create_metrics()
    receiver = Receiver(answers)
    try:
        async def main() -> str:
            return await webhooks(metrics, secret=SECRET, attempts=attempts).deliver(
                receiver.url, "b" * 32, lambda: {"request_id": "b" * 32})

        assert asyncio.run(main()) == expected
        assert len(receiver.calls) == calls
        assert retries(metrics) == calls - 1 and count(metrics, expected) == 1
        verify = readme_verifier()
        assert all(verify(SECRET, headers, body) for headers, body in receiver.calls)  # each attempt signed
    finally:
        receiver.close()


def test_connection_failures_are_retried_and_refused_addresses_are_not():
    metrics = create_metrics()
    with socket.socket() as s:  # a port nobody listens on (bound, never listening: connections are refused)
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}/hook"

        async def main() -> tuple[str, str]:
            failed = await webhooks(metrics, attempts=3).deliver(closed, "c" * 32, lambda: {})
            refused = await webhooks(metrics, limits=InputLimits(), attempts=3).deliver(closed, "d" * 32, lambda: {})
            return failed, refused

        assert asyncio.run(main()) == ("failed", "refused")
    assert retries(metrics) == 2  # the refused address: no retry
    assert count(metrics, "failed") == 1 and count(metrics, "refused") == 1


def test_a_failing_webhook_leaves_the_job_completed_and_its_result_readable():
    metrics = create_metrics()
    receiver = Receiver((500, 500))

    async def main() -> None:
        hooks = webhooks(metrics, attempts=2)
        jobs = queue(MemoryJobStore(on_finished=hooks))
        await jobs.start()
        try:
            job = await jobs.submit(request(webhook_url=receiver.url))
            await jobs.wait(job.id)
            await hooks.flush(60)
            assert (await jobs.status(job.id)).state is JobState.COMPLETED
            assert (await jobs.result(job.id)).outcome.rendered.mask_count == 2
        finally:
            await jobs.close()

    try:
        asyncio.run(main())
        assert len(receiver.calls) == 2 and count(metrics, "failed") == 1
    finally:
        receiver.close()


# -- two replicas on one redis-server ------------------------------------------------------------------------
@needs_redis
def test_two_replicas_send_each_finished_job_s_webhook_exactly_once(redis_url, receiver):
    from sam2serve.jobs.redis import RedisJobStore

    metrics = create_metrics()
    prefix = f"hooks-{uuid.uuid4().hex[:8]}:"

    async def main() -> set[str]:
        hooks = [webhooks(metrics), webhooks(metrics)]
        replicas = [queue(RedisJobStore(redis_url, prefix=prefix, heartbeat_s=60, on_finished=h)) for h in hooks]
        for replica in replicas:
            await replica.start()
        try:
            ids = [(await replicas[i % 2].submit(request(webhook_url=receiver.url))).id for i in range(8)]
            cancelled = await replicas[0].submit(request(webhook_url=receiver.url))
            await replicas[1].cancel(cancelled.id)  # ended in the queue or while running: once either way
            for i, job_id in enumerate([*ids, cancelled.id]):
                await replicas[(i + 1) % 2].wait(job_id)  # watched from the other replica
        finally:
            for replica in replicas:
                await replica.close()  # the workers are done: every JobFinished has been emitted
        for h in hooks:
            await h.flush(60)
        return {*ids, cancelled.id}

    expected = asyncio.run(main())
    assert sorted(receiver.ids()) == sorted(expected)  # each once, none twice
    assert count(metrics, "delivered") == len(expected)


@needs_redis
def test_a_stale_claim_s_finish_sends_no_webhook(redis_url, receiver):
    """Replica A's claim is taken over (A seemed lost); B finishes the job and sends its webhook; A's late
    finish changes nothing and sends nothing."""
    from sam2serve.jobs.redis import RedisJobStore

    metrics = create_metrics()
    prefix = f"stale-{uuid.uuid4().hex[:8]}:"

    async def main() -> str:
        hooks_a, hooks_b = webhooks(metrics), webhooks(metrics)
        a = RedisJobStore(redis_url, prefix=prefix, heartbeat_s=60, on_finished=hooks_a)
        b = RedisJobStore(redis_url, prefix=prefix, heartbeat_s=60, on_finished=hooks_b)
        for store in (a, b):
            await store.start()
        try:
            job = await a.add(request(webhook_url=receiver.url))
            stale = await a.claim(1.0)
            assert stale is not None
            await a._redis.zadd(a._key("replicas"), {a.replica_id: 0})  # A's heartbeat looks old
            assert await b.requeue_lost_jobs() == 1
            taken = await b.claim(1.0)
            assert taken is not None and taken.job_id == job.id
            assert await b.finish(taken, JobState.COMPLETED, outcome(3))
            assert not await a.finish(stale, JobState.COMPLETED, outcome(1))
            a.release(stale)
            b.release(taken)
        finally:
            for store in (a, b):
                await store.close()
        for h in (hooks_a, hooks_b):
            await h.flush(60)
        return job.id

    job_id = asyncio.run(main())
    assert receiver.ids() == [job_id]


# -- the server's configuration --------------------------------------------------------------------------------
def test_the_secret_comes_from_the_environment_or_a_file_and_bad_settings_stop_the_server(tmp_path):
    from sam2serve.config import ServerConfig
    from sam2serve.errors import StartupError

    (tmp_path / "secret").write_text("from-a-file\n")
    assert ServerConfig(webhook_secret="s").webhook_settings().secret == b"s"
    assert ServerConfig(webhook_secret_file=str(tmp_path / "secret")).webhook_settings().secret == b"from-a-file"
    assert ServerConfig().webhook_settings().secret == b""
    (tmp_path / "empty").write_text("\n")
    for bad, message in ((ServerConfig(webhook_secret_file=str(tmp_path / "empty")), "is empty"),
                         (ServerConfig(webhook_secret_file=str(tmp_path / "absent")), "cannot be read"),
                         (ServerConfig(webhook_attempts=0), "webhook_attempts must be at least 1")):
        with pytest.raises(StartupError, match=message):
            bad.webhook_settings()
    assert "webhook_secret=***" in ServerConfig(webhook_secret="hush").describe()


@needs_export_tools
def test_a_server_signs_with_its_secret_file_and_warns_when_it_has_none(tiny_engine, tmp_path, caplog, receiver):
    from grpc_harness import ServerThread, quick_request
    from sam2serve.config import ServerConfig

    verify = readme_verifier()
    (tmp_path / "secret").write_bytes(SECRET + b"\n")
    with caplog.at_level("WARNING", logger="sam2serve.app"):
        unsigned = ServerThread(ServerConfig(), tiny_engine)
        unsigned.stop()
    assert "webhooks are sent unsigned" in caplog.text
    caplog.clear()
    server = ServerThread(ServerConfig(allow_private_urls=True, webhook_secret_file=str(tmp_path / "secret")),
                          tiny_engine)  # the receiver listens on loopback
    try:
        assert "webhooks are sent unsigned" not in caplog.text
        job_id = server.stub.Submit(quick_request(webhook_url=receiver.url), timeout=30).request_id
        server.run(server.running.app.jobs.wait(job_id), timeout=300)
        server.run(server.running.app.webhooks.flush(60))
        [(headers, body)] = receiver.calls
        assert json.loads(body) == {"request_id": job_id, "status": "COMPLETED"} and verify(SECRET, headers, body)
    finally:
        server.stop()
