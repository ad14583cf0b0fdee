"""Faults of the Redis-shared queue with real processes: two `sam2serve serve` replicas on one redis-server.

    python tests/suite_redis_faults.py --engines engines/sam2.1_hiera_tiny [--jobs 6]

(b) redis-server killed (SIGKILL), down for --down-seconds, started again, without persistence, then with
    AOF (appendfsync always): what the clients see, jobs kept and lost, whether health said NOT_SERVING
    meanwhile, seconds from Redis's start until both replicas' health is SERVING again;
(a) one replica SIGKILLed while it runs a job: no job lost, seconds until its job is queued again (a
    replica is declared lost after 3 missed 5 s heartbeats).
It prints a markdown table. A benchmark script, not a test; tests/test_redis_suite.py runs a short version
with assertions.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import redis
from grpc_health.v1 import health_pb2, health_pb2_grpc

from grpc_harness import quick_request
from redisproc import RedisProcess
from sam2serve.v1 import sam2serve_pb2 as pb
from sam2serve.v1 import sam2serve_pb2_grpc as pb_grpc

PREFIX = "suite:"
SERVING = health_pb2.HealthCheckResponse.SERVING
TERMINAL = (pb.RequestStatus.COMPLETED, pb.RequestStatus.FAILED, pb.RequestStatus.CANCELLED)


@dataclass
class Replica:
    process: subprocess.Popen[str]
    channel: grpc.Channel

    @property
    def stub(self) -> pb_grpc.AutoSegmentServiceStub:
        return pb_grpc.AutoSegmentServiceStub(self.channel)

    def serving(self) -> bool:
        try:
            reply = health_pb2_grpc.HealthStub(self.channel).Check(health_pb2.HealthCheckRequest(), timeout=2)
            return bool(reply.status == SERVING)
        except grpc.RpcError:
            return False


@contextlib.contextmanager
def replicas(engines: str, redis_url: str, count: int = 2) -> Iterator[list[Replica]]:
    started: list[Replica] = []
    try:
        for _ in range(count):
            command = [sys.executable, "-m", "sam2serve.cli", "serve", "--engines", engines, "--host", "127.0.0.1",
                       "--port", "0", "--metrics-port", "-1", "--threads", "1", "--workers", "1",
                       "--redis-url", redis_url, "--redis-prefix", PREFIX, "--queue-size", "64",
                       "--log-level", "ERROR"]
            process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
            assert process.stdout is not None
            for line in process.stdout:
                found = re.search(r"listening on (\S+):(\d+)", line)
                if found:
                    started.append(Replica(process, grpc.insecure_channel(f"127.0.0.1:{found.group(2)}")))
                    break
            else:
                raise SystemExit(f"a replica exited with code {process.wait()} before listening")
        yield started
    finally:
        for replica in started:
            replica.channel.close()
            if replica.process.poll() is None:
                replica.process.terminate()
        for replica in started:
            replica.process.wait(60)


def submit(replica: Replica, jobs: int) -> list[str]:
    return [replica.stub.Submit(quick_request(), timeout=30).request_id for _ in range(jobs)]


def outcome(replica: Replica, job: str, timeout_s: float = 300.0) -> str:
    """The job's end as a client sees it: COMPLETED, FAILED, CANCELLED, or the status code of the error."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            for status in replica.stub.WatchStatus(pb.StatusRequest(request_id=job), timeout=timeout_s):
                if status.state in TERMINAL:
                    return str(pb.RequestStatus.State.Name(status.state))
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.UNAVAILABLE or time.monotonic() > deadline:
                return str(e.code().name)


def wait_running(client: redis.Redis) -> str:
    """A replica id (host-pid-nonce) that holds a job in its running list."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        for key in client.scan_iter(f"{PREFIX}running:*"):
            if client.llen(key):
                return key.decode().removeprefix(f"{PREFIX}running:")
        time.sleep(0.05)
    raise RuntimeError("no job started within 120 s")


def redis_restart(server: RedisProcess, pool: list[Replica], jobs: int, down_s: float) -> dict[str, object]:
    client = redis.Redis.from_url(server.url)
    ids = submit(pool[0], jobs)
    wait_running(client)
    client.close()
    server.stop(signal.SIGKILL)
    deadline = time.monotonic() + down_s  # an outage longer than a heartbeat (5 s): health must notice it
    noticed = [False] * len(pool)  # health said NOT_SERVING at some point of the outage, per replica
    while time.monotonic() < deadline:
        noticed = [seen or not replica.serving() for seen, replica in zip(noticed, pool, strict=True)]
        time.sleep(0.05)
    server.start()
    back = time.monotonic()
    errors: dict[str, int] = {}
    while not all(replica.serving() for replica in pool):
        time.sleep(0.05)
    serving_after = time.monotonic() - back
    first_call = "OK"
    try:  # the first new call after the restart
        pool[1].stub.AutoSegment(quick_request(), timeout=300)
    except grpc.RpcError as e:
        first_call = e.code().name
    ends = [outcome(pool[i % 2], job) for i, job in enumerate(ids)]
    for end in ends:
        errors[end] = errors.get(end, 0) + 1
    return {"jobs": jobs, "completed": errors.get("COMPLETED", 0), "lost": errors.get("NOT_FOUND", 0),
            "clients saw": ", ".join(f"{k} {v}" for k, v in sorted(errors.items())),
            "NOT_SERVING while down": f"{sum(noticed)} of {len(pool)}", "serving after s": serving_after,
            "first call after": first_call}


def replica_kill(server: RedisProcess, pool: list[Replica], jobs: int) -> dict[str, object]:
    client = redis.Redis.from_url(server.url)
    ids = submit(pool[0], jobs)
    victim = wait_running(client)
    running = client.lrange(f"{PREFIX}running:{victim}", 0, -1)[0].decode()
    pid = int(victim.split("-")[-2])
    doomed = next(r for r in pool if r.process.pid == pid)
    survivor = next(r for r in pool if r is not doomed)
    killed = time.monotonic()
    os.kill(pid, signal.SIGKILL)
    while client.hget(f"{PREFIX}job:{running}", "attempts") in (b"0", None):  # the reaper counts the run
        if time.monotonic() - killed > 120:
            raise RuntimeError("the killed replica's job was not requeued within 120 s")
        time.sleep(0.05)
    requeued = time.monotonic() - killed
    ends = [outcome(survivor, job) for job in ids]
    client.close()
    return {"jobs": jobs, "completed": ends.count("COMPLETED"), "lost": jobs - ends.count("COMPLETED"),
            "clients saw": ", ".join(f"{k} {ends.count(k)}" for k in sorted(set(ends))),
            "requeued after s": requeued}


def run_suite(engines: str, jobs: int, directory: Path, down_s: float = 8.0) -> dict[str, dict[str, object]]:
    results: dict[str, dict[str, object]] = {}
    server = RedisProcess(directory, aof=False).start()
    try:
        with replicas(engines, server.url) as pool:
            results["Redis SIGKILL + restart, no persistence"] = redis_restart(server, pool, jobs, down_s)
            server.stop()
            server.aof = True  # the same port, now with AOF (appendfsync always): the replicas reconnect
            server.start()
            while not all(replica.serving() for replica in pool):
                time.sleep(0.05)
            results["Redis SIGKILL + restart, AOF always"] = redis_restart(server, pool, jobs, down_s)
            results["replica SIGKILL mid-job"] = replica_kill(server, pool, jobs)
    finally:
        server.stop()
    return results


def table(results: dict[str, dict[str, object]]) -> str:
    columns = ["jobs", "completed", "lost", "clients saw", "NOT_SERVING while down", "serving after s",
               "first call after", "requeued after s"]
    lines = ["| scenario | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for name, row in results.items():
        cells = [f"{v:.1f}" if isinstance(v := row.get(c, "–"), float) else str(v) for c in columns]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engines", required=True, help="engine directory the replicas serve")
    parser.add_argument("--jobs", type=int, default=6, help="jobs in flight per scenario")
    parser.add_argument("--down-seconds", type=float, default=8.0, help="how long redis-server stays down")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as directory:
        print(table(run_suite(args.engines, args.jobs, Path(directory), args.down_seconds)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
