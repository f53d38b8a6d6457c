"""The fleet on real Redis and PostgreSQL: two workers started as two hosts share a model's
queue, show up in `farm status`, survive a kill -9 of one of them mid-job, and stop
gracefully."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import redis

import farm
from farm.registry import queries, transaction
from tests.conftest import (
    MODEL,
    REDIS_URL,
    FarmUnderTest,
    drop_pg_database,
    finished_usage,
    make_pg_database,
    prepare_registry,
)

pytestmark = pytest.mark.e2e

# Its own Redis database, so the session's other worker never takes these jobs.
FLEET_REDIS = REDIS_URL.rsplit("/", 1)[0] + "/14"


@pytest.fixture
def fleet(redis_url, pg_server, tmp_path):
    client = redis.Redis.from_url(FLEET_REDIS)
    client.flushdb()
    db = make_pg_database(pg_server)
    f = FarmUnderTest(tmp_path, FLEET_REDIS, db)
    prepare_registry(db)
    # One slot each: a job's worker is then the only thing running it.
    a = f.start_worker(MODEL, "gemma3-270m@host-a", "--parallel", "1")
    f.start_worker(MODEL, "gemma3-270m@host-b", "--parallel", "1")
    f.wait_for_lease(proc=a)
    deadline = time.monotonic() + 90
    while True:
        with transaction(db) as s:
            if len(queries.live_leases(s, MODEL)) == 2:
                break
        assert time.monotonic() < deadline, "second worker never leased the model"
        time.sleep(0.1)
    f.activate()
    yield f
    f.stop_workers()
    client.flushdb()
    drop_pg_database(pg_server, db)


def running_on(f: FarmUnderTest, job: farm.Job) -> str:
    """The worker running `job`, once it has produced its first token."""
    stream = job.stream(timeout=60)
    next(stream)
    with transaction(f.database_url) as s:
        row = queries.get_usage(s, job.id)
        state = None if row is None else (row.status, row.worker_id, row.started_at)
        assert row is not None and row.worker_id, f"job {job.id} streams but its row is {state}"
        return row.worker_id


def test_status_shows_both_workers_sharing_the_model(fleet):
    status = json.loads(fleet.farm("status", "--json").stdout)
    [model] = status["models"]
    assert model["workers"] == ["gemma3-270m@host-a", "gemma3-270m@host-b"]
    assert {w["id"] for w in status["workers"]} == set(model["workers"])
    assert all(w["state"] == "ready" and w["device"] == "cpu" for w in status["workers"])
    r = subprocess.run(
        [sys.executable, "-m", "celery", "-A", "farm.app", "inspect", "active_queues", "--json"],
        env=fleet.env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    queues = json.loads(r.stdout)
    assert set(queues) == set(model["workers"])
    assert all(q[0]["name"] == f"farm.model.{MODEL}" for q in queues.values())


def test_a_job_on_a_killed_worker_completes_on_the_other_with_one_usage_row(fleet):
    job = farm.submit("Tell me a long story about the sea.", model=MODEL, max_tokens=200)
    victim = running_on(fleet, job)
    # Keep the other worker busy and queue one more job behind: the killed worker's job must
    # go back to the front of the queue, ahead of it.
    busy = farm.submit("Tell me another long story.", model=MODEL, max_tokens=500)
    survivor = running_on(fleet, busy)
    assert survivor != victim
    behind = farm.submit("Queued behind", model=MODEL, max_tokens=2)
    proc = fleet.workers[0] if victim.endswith("host-a") else fleet.workers[1]
    killed_at = time.monotonic()
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()

    assert busy.status() == "running"  # still busy when the lost job is requeued (lease ttl 4 s)
    followed = farm.Job(job.id)
    c = followed.result(timeout=120)
    recovery = time.monotonic() - killed_at
    assert followed.restarts == 1  # streaming readers were told the text starts over
    print(
        f"\nkill -9 of {victim} mid-job: job {job.id} completed on {c.worker} "
        f"{recovery:.1f}s later (lease ttl {fleet.env['FARM_LEASE_TTL']}s)"
    )
    assert c.worker == survivor and c.usage.completion_tokens > 0
    assert recovery < 60  # kombu alone would wait for the visibility timeout (an hour)
    behind.result(timeout=60)
    [row] = finished_usage(fleet.database_url, job.id)
    [behind_row] = finished_usage(fleet.database_url, behind.id)
    assert (row.status, row.worker_id) == ("succeeded", c.worker)  # type: ignore[attr-defined]
    assert row.started_at < behind_row.started_at  # type: ignore[attr-defined]
    with transaction(fleet.database_url) as s:
        assert {w.id: w.state for w in queries.list_workers(s)}[victim] == "lost"


def test_sigterm_lets_the_running_generation_finish_then_drops_the_lease(fleet):
    job = farm.submit(
        "Tell me a long story about the sea.", model=MODEL, max_tokens=60, temperature=0
    )
    worker = running_on(fleet, job)
    proc = fleet.workers[0] if worker.endswith("host-a") else fleet.workers[1]
    proc.send_signal(signal.SIGTERM)
    c = job.result(timeout=120)
    assert c.worker == worker and c.usage.completion_tokens == 60  # not cut short
    assert proc.wait(60) == 0
    with transaction(fleet.database_url) as s:
        assert worker not in [lease.worker_id for lease in queries.live_leases(s, MODEL)]
        assert {w.id: w.state for w in queries.list_workers(s)}[worker] == "stopped"
