"""Continuous batching through the whole path: real Redis, real `farm worker` processes
with several slots, real llama.cpp. Jobs share the worker's batch, Celery's own tools
answer while every slot is busy, constrained output arrives as valid JSON, and a worker
killed with several jobs in flight loses none of them.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import redis
from sqlalchemy import func, select

import farm
from farm.registry import queries, transaction
from farm.registry.tables import UsageRecord
from tests.conftest import (
    LIVE_SLOTS,
    MODEL,
    REDIS_URL,
    FarmUnderTest,
    fill_slots,
    finished_usage,
    prepare_registry,
)

pytestmark = pytest.mark.e2e


def test_eight_jobs_share_one_worker_and_status_shows_every_slot_busy(farm_client):
    samplings: list[dict[str, object]] = [
        {"temperature": 0},
        {"temperature": 0.7, "seed": 1},
        {"top_k": 5, "seed": 2},
        {"top_p": 0.5, "seed": 3},
        {"min_p": 0.2, "seed": 4},
        {"repeat_penalty": 1.3, "seed": 5},
        {"mirostat_mode": 2, "seed": 6},
        {"typical_p": 0.7, "seed": 7},
    ]
    assert len(samplings) == LIVE_SLOTS
    jobs = [
        farm.submit(f"Tell me a long story, part {i}.", model=MODEL, max_tokens=60, **s)
        for i, s in enumerate(samplings)
    ]
    for job in jobs:
        next(job.stream(timeout=120))  # every one is generating
    status = json.loads(farm_client.farm("status", "--json").stdout)
    [worker] = [w for w in status["workers"] if w["state"] != "lost"]
    assert (worker["slots_busy"], worker["slots"]) == (LIVE_SLOTS, LIVE_SLOTS)
    assert sorted(worker["jobs"]) == sorted(j.id for j in jobs)
    assert worker["threads"] >= 1
    for job in jobs:
        c = job.result(timeout=120)
        [row] = finished_usage(farm_client.database_url, job.id)
        assert row.status == "succeeded"  # type: ignore[attr-defined]
        assert row.completion_tokens == c.usage.completion_tokens > 0  # type: ignore[attr-defined]
        assert c.finish_reason == "stop" or c.usage.completion_tokens == 60


def celery(farm: FarmUnderTest, *command: str) -> subprocess.CompletedProcess[str]:
    """Celery's own CLI against the farm, waiting up to 10 s for the worker's replies
    (Celery's default, 1 s, is short while every slot generates on 2 cores)."""
    return subprocess.run(
        [sys.executable, "-m", "celery", "-A", "farm.app", *command, "--timeout", "10"],
        env=farm.env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_celery_inspect_names_the_running_jobs_while_every_slot_is_busy(farm_client):
    busy = fill_slots(max_tokens=120)
    started = time.monotonic()
    r = celery(farm_client, "inspect", "active", "--json")
    answered = time.monotonic() - started
    assert r.returncode == 0, r.stderr
    active = json.loads(r.stdout)
    running = {task["id"] for tasks in active.values() for task in tasks}
    assert {j.id for j in busy} <= running
    ping = celery(farm_client, "status")
    assert ping.returncode == 0 and "1 node online" in ping.stdout, ping.stdout + ping.stderr
    stats = celery(farm_client, "inspect", "stats", "--json")
    [worker_stats] = json.loads(stats.stdout).values()
    assert worker_stats["pool"]["max-concurrency"] == len(busy)
    print(f"\n`celery inspect active` answered in {answered:.1f}s with {len(busy)} slots busy")
    for job in busy:
        job.result(timeout=120)


def test_a_freed_slot_takes_the_next_queued_job_at_once(farm_client):
    busy = fill_slots(max_tokens=40)
    queued = farm.submit("Next in line", model=MODEL, max_tokens=2, priority="high")
    queued.result(timeout=120)
    rows = {
        r.job_id: r
        for r in (finished_usage(farm_client.database_url, j.id)[0] for j in [*busy, queued])
    }
    first_free = min(rows[j.id].finished_at for j in busy)  # type: ignore[attr-defined]
    gap = (rows[queued.id].started_at - first_free).total_seconds()  # type: ignore[attr-defined]
    print(f"\nqueued job started {gap * 1000:.0f} ms after the first slot was freed")
    # Celery's threads pool with one slot took about 2 s (a timer tick); a freed slot here
    # is refilled as soon as the task returns.
    assert gap < 1.0


def test_a_json_schema_reply_through_the_farm_parses_and_fits_the_schema(farm_client):
    schema = {
        "type": "object",
        "properties": {"answer": {"enum": ["yes", "no"]}, "confidence": {"type": "integer"}},
        "required": ["answer", "confidence"],
    }
    c = farm.infer(
        "Is the sky blue? Answer in JSON.",
        model=MODEL,
        max_tokens=40,
        temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "a", "schema": schema}},
        timeout=120,
    )
    value = json.loads(c.text)
    assert value["answer"] in ("yes", "no") and isinstance(value["confidence"], int)


def test_a_grammar_from_the_cli_constrains_the_reply(farm_client, tmp_path):
    grammar = tmp_path / "yesno.gbnf"
    grammar.write_text('root ::= "yes" | "no"\n')
    r = farm_client.farm("submit", "Is water wet?", "--grammar", str(grammar), "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["text"] in ("yes", "no")


def _usage_count(db_url: str) -> int:
    with transaction(db_url) as s:
        return int(s.scalar(select(func.count()).select_from(UsageRecord)) or 0)


def test_a_bad_grammar_or_schema_is_refused_at_submit_and_nothing_is_queued(farm_client, tmp_path):
    before = _usage_count(farm_client.database_url)
    with pytest.raises(farm.InvalidRequest, match="invalid 'grammar': line 1: .*never defined"):
        farm.submit("hi", model=MODEL, grammar='root ::= "a" answer')
    with pytest.raises(farm.InvalidRequest, match="'response_format"):
        farm.submit("hi", model=MODEL, response_format={"type": "json_schema"})
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    r = farm_client.farm("submit", "hi", "--json-schema", str(bad))
    assert r.returncode != 0 and "--json-schema" in r.stderr and "not JSON" in r.stderr
    assert _usage_count(farm_client.database_url) == before


# Its own Redis database, so the shared live farm's worker never takes these jobs.
KILL_REDIS = REDIS_URL.rsplit("/", 1)[0] + "/12"


def test_kill_9_with_four_jobs_in_flight_each_finishes_elsewhere_with_one_usage_row(
    redis_url, tmp_path
):
    client = redis.Redis.from_url(KILL_REDIS)
    client.flushdb()
    f = FarmUnderTest(tmp_path, KILL_REDIS, f"sqlite:///{tmp_path / 'registry.db'}")
    prepare_registry(f.database_url)
    try:
        victim = f.start_worker(MODEL, "victim@test", "--parallel", "4")
        f.wait_for_lease(proc=victim)
        f.activate()
        jobs = fill_slots(4, max_tokens=200)
        with transaction(f.database_url) as s:
            assert sorted(queries.running_jobs(s)["victim@test"]) == sorted(j.id for j in jobs)
        rescuer = f.start_worker(MODEL, "rescuer@test", "--parallel", "4")
        deadline = time.monotonic() + 90
        while True:
            with transaction(f.database_url) as s:
                if len(queries.live_leases(s, MODEL)) == 2:
                    break
            assert time.monotonic() < deadline and rescuer.poll() is None
            time.sleep(0.1)
        killed_at = time.monotonic()
        os.kill(victim.pid, signal.SIGKILL)
        victim.wait()
        completions = [farm.Job(j.id).result(timeout=180) for j in jobs]
        print(f"\n4 jobs of a kill -9'd worker done {time.monotonic() - killed_at:.1f}s later")
        for job, c in zip(jobs, completions, strict=True):
            assert c.worker == "rescuer@test" and c.usage.completion_tokens > 0
            [row] = finished_usage(f.database_url, job.id)
            assert (row.status, row.worker_id) == ("succeeded", "rescuer@test")  # type: ignore[attr-defined]
    finally:
        f.stop_workers()
        client.flushdb()
