"""Batch jobs end to end, as cron runs them: `farm batch` commands against the live farm's
real worker, with the feeder in its own process (`farm batch feeder`)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import select

import farm
from farm.context import FarmContext, get_context
from farm.depth import queued
from farm.queue import PRIORITY_STEPS, fair_jobs_key, priority_list_key
from farm.registry import transaction
from farm.registry.tables import BatchLineRecord, UsageRecord, as_utc
from tests.conftest import MODEL, FarmUnderTest

pytestmark = pytest.mark.e2e

WINDOW = 16


@pytest.fixture(scope="module")
def feeder(live_farm: FarmUnderTest) -> Iterator[FarmUnderTest]:
    env = {**live_farm.env, "FARM_BATCH_WINDOW": str(WINDOW)}
    log = (live_farm.home / "feeder.log").open("ab")
    proc = subprocess.Popen(
        [sys.executable, "-m", "farm.cli", "batch", "feeder"], env=env, stdout=log, stderr=log
    )
    yield live_farm
    proc.terminate()
    proc.wait(30)


def write_batch(
    path: Path, n: int, *, max_tokens: int = 4, extra: list[dict] | None = None
) -> Path:
    lines = [
        {
            "custom_id": f"req-{i}",
            "method": "POST",
            "url": "/v1/chat/completions" if i % 2 else "/v1/completions",
            "body": {"model": MODEL, "max_tokens": max_tokens, "seed": i}
            | (
                {"messages": [{"role": "user", "content": f"Name a colour, {i}."}]}
                if i % 2
                else {"prompt": f"Colour number {i} is"}
            ),
        }
        for i in range(n)
    ]
    path.write_text("".join(json.dumps(x) + "\n" for x in lines + (extra or [])))
    return path


def lines_of(database_url: str, batch_id: str) -> list[BatchLineRecord]:
    with transaction(database_url) as s:
        found = list(s.scalars(select(BatchLineRecord).where(BatchLineRecord.batch_id == batch_id)))
        for line in found:
            s.expunge(line)
        return found


def usage_rows(database_url: str, job_ids: list[str]) -> list[UsageRecord]:
    with transaction(database_url) as s:
        return list(s.scalars(select(UsageRecord).where(UsageRecord.job_id.in_(job_ids))))


def waiting_job_ids(ctx: FarmContext, model: str) -> set[str]:
    """The jobs waiting for a model: in its queue's lists and held for their fair turn."""
    pipe = ctx.broker_redis.pipeline(transaction=False)
    for step in PRIORITY_STEPS:
        pipe.lrange(priority_list_key(model, step), 0, -1)
    pipe.hkeys(fair_jobs_key(model))
    *lists, held = pipe.execute()
    ids = {json.loads(raw)["headers"]["id"] for messages in lists for raw in messages}
    return ids | {k.decode() if isinstance(k, bytes) else k for k in held}


def test_a_cron_batch_twice_under_one_name_runs_once_and_writes_results_and_errors(
    feeder: FarmUnderTest, tmp_path: Path
):
    too_long = {
        "custom_id": "too-long",
        "method": "POST",
        "url": "/v1/completions",
        "body": {"model": MODEL, "prompt": "word " * 5000, "max_tokens": 4},
    }
    path = write_batch(tmp_path / "nightly.jsonl", 12, extra=[too_long])
    first = feeder.farm("batch", "submit", str(path), "--name", "nightly-e2e", "--session", "cron")
    assert first.returncode == 0, first.stderr
    batch_id = first.stdout.strip()
    assert batch_id.startswith("batch_") and "13 lines queued" in first.stderr
    again = feeder.farm("batch", "submit", str(path), "--name", "nightly-e2e", "--session", "cron")
    assert again.returncode == 0 and again.stdout.strip() == batch_id
    assert "nothing queued again" in again.stderr

    waited = feeder.farm("batch", "wait", batch_id, "--timeout", "180", "--json")
    assert waited.returncode == 3, waited.stderr  # completed, with one failed line
    batch = json.loads(waited.stdout)
    assert batch["status"] == "completed"
    assert batch["request_counts"] == {"total": 13, "completed": 12, "failed": 1}

    out = tmp_path / "out.jsonl"
    assert feeder.farm("batch", "results", batch_id, "-o", str(out)).returncode == 0
    results = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["custom_id"] for r in results] == [f"req-{i}" for i in range(12)]
    for r in results:
        body = r["response"]["body"]
        assert r["response"]["status_code"] == 200 and body["usage"]["completion_tokens"] > 0
        chat = int(r["custom_id"].removeprefix("req-")) % 2 == 1
        assert body["object"] == ("chat.completion" if chat else "text_completion")
    errors = feeder.farm("batch", "errors", batch_id)
    [error] = [json.loads(x) for x in errors.stdout.splitlines()]
    assert error["custom_id"] == "too-long" and error["response"]["status_code"] == 400
    assert "5002 tokens" in error["response"]["body"]["error"]["message"]

    # Each line ran once: one job, one usage row, billed to the batch's session.
    lines = lines_of(feeder.database_url, batch_id)
    assert len(lines) == 13 and all(line.attempts == 1 for line in lines)
    rows = usage_rows(feeder.database_url, [line.job_id for line in lines if line.job_id])
    assert len(rows) == 13 and {r.session for r in rows} == {"cron"}
    assert {r.priority for r in rows} == {"low"}
    usage = json.loads(feeder.farm("usage", "--batch", "nightly-e2e", "--json").stdout)
    assert usage[0]["jobs"] == 13 and usage[0]["succeeded"] == 12 and usage[0]["failed"] == 1


def test_a_high_job_goes_ahead_of_a_200_line_batch_and_redis_holds_the_window(
    feeder: FarmUnderTest, tmp_path: Path
):
    path = write_batch(tmp_path / "big.jsonl", 200, max_tokens=12)
    batch_id = feeder.farm("batch", "submit", str(path)).stdout.strip()
    ctx = get_context()
    depths = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # until lines are running and more wait behind them
        depths.append(queued(ctx, MODEL))
        if len([x for x in lines_of(feeder.database_url, batch_id) if x.status != "pending"]) > 30:
            break
        time.sleep(0.1)
    job = farm.submit("Say hi.", model=MODEL, priority="high", max_tokens=2)
    behind = waiting_job_ids(ctx, MODEL)  # read once the high job is queued
    job.result(timeout=120)
    for _ in range(20):
        depths.append(queued(ctx, MODEL))
        time.sleep(0.05)
    [high] = usage_rows(feeder.database_url, [job.id])
    assert high.started_at is not None
    started_high = as_utc(high.started_at).timestamp()

    # Every line still waiting once the high job was queued was behind it: the high job
    # waited only for a slot to free, not for the lines queued before it. Lines the worker
    # had already taken off the queue may start after the submit; these may not. One may
    # record its start first when two slots free in the same instant and another thread
    # takes it just after the high job.
    behind.discard(job.id)
    assert behind, "no line was waiting when the high job was queued: nothing was tested"
    rows = usage_rows(feeder.database_url, sorted(behind))
    overtaking = [
        r for r in rows if r.started_at and as_utc(r.started_at).timestamp() < started_high
    ]
    print("BEHIND", len(overtaking), len(behind))
    assert len(overtaking) <= 1, (len(overtaking), len(behind))
    # The batch never had more than the feeder's window in the queue.
    assert max(depths) <= WINDOW, depths
    assert any(d > 0 for d in depths)
    waited = feeder.farm("batch", "wait", batch_id, "--timeout", "300")
    assert waited.returncode == 0, waited.stdout + waited.stderr


def test_two_batches_share_the_worker(feeder: FarmUnderTest, tmp_path: Path):
    first = feeder.farm("batch", "submit", str(write_batch(tmp_path / "a.jsonl", 48, max_tokens=6)))
    (tmp_path / "b").mkdir()
    path = write_batch(tmp_path / "b" / "b.jsonl", 48, max_tokens=7)  # another file, another hash
    second = feeder.farm("batch", "submit", str(path))
    a, b = first.stdout.strip(), second.stdout.strip()
    assert a != b
    # Before either ends, both have lines done: the feeder splits the window between them.
    deadline = time.monotonic() + 120
    while True:
        done = {
            x: len(
                [line for line in lines_of(feeder.database_url, x) if line.status == "succeeded"]
            )
            for x in (a, b)
        }
        if min(done.values()) > 0:
            break
        assert max(done.values()) < 48, f"one batch finished before the other started: {done}"
        assert time.monotonic() < deadline
        time.sleep(0.2)
    for x in (a, b):
        assert feeder.farm("batch", "wait", x, "--timeout", "180").returncode == 0
