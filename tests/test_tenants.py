"""Tenants: API keys name a tenant (`tenant:key` entries, a file of them, and the old single --api-key as the
default tenant); a request id is visible only to the tenant that submitted it, the others being told NOT_FOUND in
the words of an unknown id, in both queues (in-process, Redis) and both protocols (gRPC, fal's HTTP API); and
per-tenant metrics stay within their bound of label values."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from dataclasses import replace

import grpc
import httpx
import pytest

from conftest import needs_export_tools, needs_redis
from fal_harness import APP, QUICK, data_uri
from grpc_harness import ServerThread, quick_request
from jobfakes import outcome, request, service
from sam2serve.config import ServerConfig
from sam2serve.errors import JobNotFound, StartupError
from sam2serve.jobs import JobService, JobState
from sam2serve.jobs.memory import MemoryJobStore
from sam2serve.jobs.model import new_id, not_found
from sam2serve.metrics import create_metrics
from sam2serve.tenants import DEFAULT_TENANT, TenantLabels, api_keys
from sam2serve.v1 import sam2serve_pb2 as pb

State = pb.RequestStatus


# -- the key format ------------------------------------------------------------------------------------------
def test_keys_name_their_tenants_and_the_old_single_key_still_works(tmp_path):
    file = tmp_path / "keys"
    file.write_text("# tenant:key per line\ncarol:k:with:colons\n\n  dave : kd  # trailing comment\n")
    keys = api_keys(api_key="legacy", entries="alice:ka, bob:kb,alice:ka2", entries_file=str(file))
    assert keys.required and keys.tenants == (DEFAULT_TENANT, "alice", "bob", "carol", "dave")
    assert [keys.tenant_of(f"Key {k}") for k in ("legacy", "ka", "ka2", "kb", "k:with:colons", "kd")] == [
        DEFAULT_TENANT, "alice", "alice", "bob", "carol", "dave"]
    assert keys.tenant_of("Bearer kb") == "bob" and keys.tenant_of(b"Key kb") == "bob"
    for wrong in ("Key nope", "Basic ka", "ka", "", "Key "):
        assert keys.tenant_of(wrong) is None
    assert api_keys().tenant_of("") == DEFAULT_TENANT and not api_keys().required  # no keys: no authentication


@pytest.mark.parametrize(("entries", "message"), [
    ("alice", "entry 1 is not 'tenant:key'"),
    ("alice:ka,bob:", "entry 2 is not 'tenant:key'"),
    ("al ice:ka", "entry 1: tenant names are"),
    (":ka", "entry 1: tenant names are"),
    ("alice:shared,bob:shared", "one API key is given for two tenants ('alice' and 'bob')"),
])
def test_malformed_keys_stop_the_server_without_showing_a_key(entries, message):
    with pytest.raises(StartupError) as info:
        api_keys(entries=entries)
    assert message in str(info.value)
    assert "shared" not in str(info.value).replace("'alice' and 'bob'", "") and "ka" not in str(info.value)


def test_an_unreadable_keys_file_stops_the_server(tmp_path):
    with pytest.raises(StartupError, match=r"api_keys_file .* cannot be read"):
        api_keys(entries_file=str(tmp_path / "absent"))


def test_tenant_metric_labels_are_bounded():
    labels = TenantLabels((DEFAULT_TENANT, "alice", "bob", "carol"), limit=2)
    assert [labels(t) for t in (DEFAULT_TENANT, "alice", "bob", "carol", "mallory")] == [
        "default", "alice", "bob", "other", "other"]


# -- the job layer, both stores --------------------------------------------------------------------------------
@pytest.fixture(params=["memory", pytest.param("redis", marks=needs_redis)])
def make_queue(request: pytest.FixtureRequest):
    if request.param == "memory":
        return lambda: service(MemoryJobStore(), lambda *a: outcome())
    from sam2serve.jobs.redis import RedisJobStore

    url, prefix = request.getfixturevalue("redis_url"), f"tenants-{uuid.uuid4().hex[:8]}:"
    return lambda: service(RedisJobStore(url, prefix=prefix, heartbeat_s=60), lambda *a: outcome())


def test_a_job_is_visible_only_to_its_tenant(make_queue):
    async def main() -> None:
        jobs: JobService = make_queue()
        await jobs.start()
        try:
            job = await jobs.submit(replace(request(), tenant="alice"))
            assert (await jobs.wait(job.id)).state is JobState.COMPLETED
            unknown = str(not_found(job.id))  # what an id nobody issued is told
            for other in ("bob", DEFAULT_TENANT):
                for call in (lambda t: jobs.status(job.id, t), lambda t: jobs.result(job.id, t),
                             lambda t: jobs.cancel(job.id, t), lambda t: anext(jobs.watch(job.id, t))):
                    with pytest.raises(JobNotFound) as info:
                        await call(other)
                    assert str(info.value) == unknown
            assert (await jobs.status(job.id, "alice")).state is JobState.COMPLETED
            assert (await jobs.result(job.id, "alice")).outcome.rendered.mask_count == 2
            assert (await anext(jobs.watch(job.id, "alice"))).tenant == "alice"
            with pytest.raises(JobNotFound) as missing:
                await jobs.status(new_id(), "alice")
            assert "(unknown, or its result expired)" in str(missing.value)
        finally:
            await jobs.close()

    asyncio.run(main())


def test_another_tenant_cannot_cancel_a_queued_job(make_queue):
    async def main() -> None:
        jobs: JobService = make_queue()
        await jobs.store.start()  # no worker: the job stays queued
        try:
            job = await jobs.submit(replace(request(), tenant="alice"))
            with pytest.raises(JobNotFound):
                await jobs.cancel(job.id, "bob")
            assert (await jobs.status(job.id, "alice")).state is JobState.IN_QUEUE
        finally:
            await jobs.store.close()

    asyncio.run(main())


# -- both protocols, both queues ---------------------------------------------------------------------------------
KEYS = "alice:alice-key,bob:bob-key"


def meta(key: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Key {key}"),)


@pytest.fixture(params=["memory", pytest.param("redis", marks=needs_redis)])
def replicas(request: pytest.FixtureRequest, tiny_engine) -> Iterator[tuple[ServerThread, ServerThread]]:
    """(front, back): the same server in-process; two replicas on one Redis otherwise."""
    config = ServerConfig(workers=1, queue_size=4, api_key="legacy-key", api_keys=KEYS, http_port=0)
    if request.param == "memory":
        server = ServerThread(config, tiny_engine)
        yield server, server
        server.stop()
        return
    shared = replace(config, redis_url=request.getfixturevalue("redis_url"),
                     redis_prefix=f"tenants-{uuid.uuid4().hex[:8]}:")
    front, back = ServerThread(shared, tiny_engine), ServerThread(shared, tiny_engine)
    yield front, back
    front.stop()
    back.stop()


@needs_export_tools
def test_other_tenants_get_not_found_over_grpc_and_http(replicas):
    front, back = replicas
    by_grpc = front.stub.Submit(quick_request(), metadata=meta("alice-key"), timeout=30).request_id
    alice_http = httpx.Client(base_url=front.http_base, headers={"Authorization": "Key alice-key"}, timeout=120)
    # a job that fails at once (its image does not decode): another tenant must not see its error either
    submitted = alice_http.post(f"/queue/{APP}", json={"image_url": data_uri(b"not an image"), **QUICK})
    assert submitted.status_code == 200, submitted.text
    by_http = submitted.json()["request_id"]
    for request_id, state in ((by_grpc, State.COMPLETED), (by_http, State.FAILED)):
        final = list(back.stub.WatchStatus(pb.StatusRequest(request_id=request_id), metadata=meta("alice-key"),
                                           timeout=300))[-1]
        assert final.state == state

    calls = [(back.stub.GetStatus, pb.StatusRequest, False), (back.stub.WatchStatus, pb.StatusRequest, True),
             (back.stub.GetResult, pb.ResultRequest, False), (back.stub.Cancel, pb.CancelRequest, False)]
    bob_http = httpx.Client(base_url=back.http_base, headers={"Authorization": "Key bob-key"}, timeout=60)
    for request_id in (by_grpc, by_http):
        unknown = str(not_found(request_id))
        for key in ("bob-key", "legacy-key"):  # another tenant, and the default tenant of the old --api-key
            for method, message, streaming in calls:
                with pytest.raises(grpc.RpcError) as info:
                    reply = method(message(request_id=request_id), metadata=meta(key), timeout=10)
                    if streaming:
                        list(reply)
                assert info.value.code() == grpc.StatusCode.NOT_FOUND and info.value.details() == unknown
        base = f"/queue/fal-ai/sam2/requests/{request_id}"
        for method, path in (("GET", f"{base}/status"), ("GET", f"{base}/status/stream"), ("GET", base),
                             ("PUT", f"{base}/cancel"), ("GET", f"/files/{request_id}/combined_mask.png")):
            response = bob_http.request(method, path)
            assert response.status_code == 404 and response.json()["detail"] == unknown, (path, response.text)

    # alice still sees both, on either replica and either protocol; bob's cancels changed nothing
    assert back.stub.GetResult(pb.ResultRequest(request_id=by_grpc), metadata=meta("alice-key"),
                               timeout=30).total_masks >= 1
    assert httpx.get(f"{back.http_base}/queue/fal-ai/sam2/requests/{by_grpc}/status",
                     headers={"Authorization": "Key alice-key"}).json()["status"] == "COMPLETED"
    failed = httpx.get(f"{back.http_base}/queue/fal-ai/sam2/requests/{by_http}",
                       headers={"Authorization": "Key alice-key"})
    assert failed.status_code == 422 and "not a supported image" in failed.text
    with pytest.raises(grpc.RpcError) as wrong:
        back.stub.GetStatus(pb.StatusRequest(request_id=by_grpc), metadata=meta("nobody"), timeout=10)
    assert wrong.value.code() == grpc.StatusCode.UNAUTHENTICATED
    alice_http.close()
    bob_http.close()


@needs_export_tools
def test_per_tenant_job_metrics_are_off_by_default_and_bounded(tiny_engine):
    metrics = create_metrics()
    assert metrics.registry.get_sample_value("sam2serve_tenant_jobs_total", {"tenant": "alice",
                                                                             "outcome": "completed"}) is None
    server = ServerThread(ServerConfig(api_keys=KEYS, tenant_metrics=1), tiny_engine)
    try:
        for key in ("alice-key", "bob-key"):  # jobs that fail at once (no engine time): counted all the same
            with pytest.raises(grpc.RpcError) as info:
                server.stub.AutoSegment(quick_request(image_bytes=b"not an image"), metadata=meta(key), timeout=300)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        registry = server.running.app.metrics.registry
        assert registry.get_sample_value("sam2serve_tenant_jobs_total",
                                         {"tenant": "alice", "outcome": "failed"}) == 1
        assert registry.get_sample_value("sam2serve_tenant_jobs_total",
                                         {"tenant": "other", "outcome": "failed"}) == 1
        assert registry.get_sample_value("sam2serve_tenant_jobs_total",
                                         {"tenant": "bob", "outcome": "failed"}) is None
    finally:
        server.stop()
