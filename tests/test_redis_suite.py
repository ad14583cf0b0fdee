"""The short version of tests/suite_redis_faults.py: two `sam2serve serve` processes on one redis-server,
which is killed and restarted without and with AOF, then one replica is killed mid-job."""

from __future__ import annotations

from conftest import needs_export_tools, needs_redis
from suite_redis_faults import run_suite


@needs_export_tools
@needs_redis
def test_replicas_recover_from_redis_restarts_and_a_killed_replica_loses_no_job(tiny_engine_dir, tmp_path):
    results = run_suite(str(tiny_engine_dir), jobs=2, directory=tmp_path, down_s=8.0)
    lost_redis = results["Redis SIGKILL + restart, no persistence"]
    aof = results["Redis SIGKILL + restart, AOF always"]
    killed = results["replica SIGKILL mid-job"]
    for row in (lost_redis, aof):
        assert row["NOT_SERVING while down"] == "2 of 2"
        assert row["first call after"] == "OK"
        assert isinstance(row["serving after s"], float) and row["serving after s"] < 5.0
    assert lost_redis["lost"] == 2 and lost_redis["clients saw"] == "NOT_FOUND 2"
    assert aof["completed"] == 2 and aof["lost"] == 0
    assert killed["completed"] == 2 and killed["lost"] == 0
    assert isinstance(killed["requeued after s"], float) and killed["requeued after s"] < 30.0
