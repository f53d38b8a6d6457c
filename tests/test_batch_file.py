"""Batch files and batches in the registry, without a worker: every bad line reported as
`LINE: field: reason` with nothing created, idempotent names, cancel and the completion
window. The feeder is run pass by pass (Feeder.step) against a real Redis."""

from __future__ import annotations

import json
import time
from datetime import timedelta
from pathlib import Path

import pytest
import redis
from sqlalchemy import func, select, update

import farm.batches as batches
from farm.batches.feeder import Feeder
from farm.config import Settings
from farm.context import FarmContext
from farm.errors import BatchFileError, InvalidRequest, UnknownBatch
from farm.queue import BATCH_FEEDER_LOCK
from farm.registry import queries, transaction
from farm.registry.db import upgrade
from farm.registry.tables import BatchLineRecord, BatchRecord, utcnow
from tests.conftest import drop_pg_database, make_pg_database

MODEL = "tiny"


@pytest.fixture
def ctx(migrated_db: str, redis_url: str, tmp_path: Path) -> FarmContext:
    with transaction(migrated_db) as s:
        queries.add_model(s, name=MODEL, path="/models/tiny.gguf", n_ctx=512)
    c = FarmContext(Settings(home=tmp_path, broker_url=redis_url, database_url=migrated_db))
    redis.Redis.from_url(redis_url).delete(BATCH_FEEDER_LOCK)
    return c


def line(custom_id: str, **body: object) -> str:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], **body}
    return json.dumps(
        {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions", "body": body}
    )


def n_batches(ctx: FarmContext) -> int:
    with transaction(ctx.database_url) as s:
        return int(s.scalar(select(func.count()).select_from(BatchRecord)) or 0)


def test_every_bad_line_is_reported_and_nothing_is_created(ctx: FarmContext, tmp_path: Path):
    path = tmp_path / "bad.jsonl"
    path.write_text(
        "\n".join(
            [
                line("ok-1"),
                "{not json",
                line("ok-1"),  # a duplicate custom_id
                line("t", temperature=9),
                line("m", model="deepsek"),
                line("x", max_tokens=600),  # more than the model's context
                json.dumps({"custom_id": "u", "url": "/v1/moderations", "body": {}}),
                line("s", stream=True),
                line("f", bogus=1),
                "",
                "[1, 2]",
                "[" * 100_000 + "]" * 100_000,
            ]
        )
    )
    with pytest.raises(BatchFileError) as e:
        batches.submit(path, ctx=ctx)
    assert e.value.errors == [
        "2: line: not JSON (Expecting property name enclosed in double quotes at column 2): "
        "one JSON object per line",
        "3: custom_id: 'ok-1' is also on line 1",
        "4: body.temperature: Input should be less than or equal to 5 (got 9)",
        "5: body.model: unknown model 'deepsek'; registered: tiny",
        "6: body.max_tokens: 600 is more than model 'tiny' holds (context 512 tokens)",
        "7: url: must be one of /v1/chat/completions, /v1/completions, /v1/embeddings "
        "(got '/v1/moderations')",
        "8: body.stream: streaming is not available in a batch; leave it out",
        "9: body.bogus: unknown parameter 'bogus'",
        "11: line: a JSON object is needed, not list",
        "12: line: nested too deeply to be a request",
    ]
    assert "10 bad lines; nothing was queued" in str(e.value)
    assert n_batches(ctx) == 0

    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(InvalidRequest, match="holds no requests"):
        batches.submit(empty, ctx=ctx)
    with pytest.raises(InvalidRequest, match="cannot read the batch file"):
        batches.submit(tmp_path / "missing.jsonl", ctx=ctx)
    with pytest.raises(InvalidRequest, match="completion_window"):
        batches.submit(path, completion_window="forever", ctx=ctx)
    assert n_batches(ctx) == 0


def test_a_name_or_the_same_file_gives_back_the_same_batch(ctx: FarmContext, tmp_path: Path):
    path = tmp_path / "nightly.jsonl"
    path.write_text("\n".join(line(f"q{i}") for i in range(5)) + "\n")
    first, created = batches.submit(path, name="nightly-2026-11-25", ctx=ctx)
    again, created_again = batches.submit(path, name="nightly-2026-11-25", ctx=ctx)
    assert created and not created_again and again.id == first.id
    assert first.total == 5 and first.counts == {"pending": 5} and first.priority == "low"

    unnamed, created = batches.submit(path, ctx=ctx)  # named by the file's hash
    same, created_again = batches.submit(path.read_bytes(), ctx=ctx)
    assert created and not created_again and same.id == unnamed.id != first.id
    assert batches.get(first.name, ctx=ctx).id == first.id  # found by name too
    # Another session: the same file is its own batch; the same name is refused.
    theirs, created = batches.submit(path, session="bob", ctx=ctx)
    assert created and theirs.id != unnamed.id and theirs.session == "bob"
    with pytest.raises(InvalidRequest, match="taken by another session's batch"):
        batches.submit(path, name="nightly-2026-11-25", session="bob", ctx=ctx)
    with transaction(ctx.database_url) as s:
        assert s.scalar(select(func.count()).select_from(BatchLineRecord)) == 15
    with pytest.raises(UnknownBatch, match="farm batch list"):
        batches.get("batch_nope", ctx=ctx)
    with pytest.raises(UnknownBatch):
        batches.get(first.id, session="someone-else", ctx=ctx)


def test_lines_wait_for_a_worker_and_cancel_ends_the_batch(ctx: FarmContext, tmp_path: Path):
    from farm.metrics import render
    from farm.status import fleet_status

    path = tmp_path / "b.jsonl"
    path.write_text("\n".join(line(f"q{i}") for i in range(3)))
    batch, _ = batches.submit(path, ctx=ctx)
    feeder = Feeder(ctx, window=2)
    assert feeder.step() == 0  # no worker serves 'tiny': nothing is queued, nothing lost
    assert batches.get(batch.id, ctx=ctx).counts == {"pending": 3}
    [shown] = fleet_status(ctx)["batches"]  # `farm status` shows the batch waiting
    assert (shown["id"], shown["pending"], shown["total"]) == (batch.id, 3, 3)
    scrape = render(ctx).decode()
    assert 'farm_batch_lines{model="tiny",status="pending"} 3.0' in scrape
    assert 'farm_batches{status="in_progress"} 1.0' in scrape

    cancelled = batches.cancel(batch.id, ctx=ctx)  # none queued: cancelled at once
    assert cancelled.status == "cancelled" and cancelled.counts == {"cancelled": 3}
    feeder.step()
    ended = batches.get(batch.id, ctx=ctx)
    assert ended.status == "cancelled" and ended.failed == 3 and ended.error_file_id
    [first, *_] = [json.loads(t) for t in batches.results(batch.id, failed=True, ctx=ctx)]
    assert first["custom_id"] == "q0" and first["response"] is None
    assert first["error"]["code"] == "batch_cancelled"
    assert list(batches.results(batch.id, ctx=ctx)) == []


def test_a_reader_slower_than_the_registrys_idle_limit_still_gets_every_line(
    pg_server: str, redis_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """`farm batch results | less`, or a slow client of the gateway: PostgreSQL ends a
    session idle in a transaction after 30 s (1 s here), so no transaction may stay open
    while the reader takes its time between pages (2 lines here)."""
    from farm.batches import store
    from farm.registry import db as db_module

    url = make_pg_database(pg_server)
    try:
        upgrade(url)
        monkeypatch.setattr(db_module, "IDLE_IN_TRANSACTION_MS", 1000)
        db_module.get_engine(url).dispose()  # its next connections get the 1 s
        monkeypatch.setattr(store, "PAGE", 2)
        with transaction(url) as s:
            queries.add_model(s, name=MODEL, path="/models/tiny.gguf", n_ctx=512)
        slow = FarmContext(Settings(home=tmp_path, broker_url=redis_url, database_url=url))
        path = tmp_path / "b.jsonl"
        path.write_text("\n".join(line(f"q{i}") for i in range(5)))
        batch, _ = batches.submit(path, ctx=slow)
        batches.cancel(batch.id, ctx=slow)
        read = []
        for text in batches.results(batch.id, failed=True, ctx=slow):
            read.append(json.loads(text)["custom_id"])
            time.sleep(1.5)
        assert read == ["q0", "q1", "q2", "q3", "q4"]
    finally:
        drop_pg_database(pg_server, url)


def test_lines_not_started_when_the_window_ends_expire(ctx: FarmContext, tmp_path: Path):
    path = tmp_path / "b.jsonl"
    path.write_text("\n".join(line(f"q{i}") for i in range(2)))
    batch, _ = batches.submit(path, completion_window="1h", ctx=ctx)
    with transaction(ctx.database_url) as s:
        s.execute(
            update(BatchRecord)
            .where(BatchRecord.id == batch.id)
            .values(expires_at=utcnow() - timedelta(seconds=1))
        )
    Feeder(ctx).step()
    ended = batches.get(batch.id, ctx=ctx)
    assert ended.status == "expired" and ended.counts == {"expired": 2}
    errors = [json.loads(t) for t in batches.results(batch.id, failed=True, ctx=ctx)]
    assert [e["error"]["code"] for e in errors] == ["batch_expired", "batch_expired"]
    assert ended.to_json()["completion_window"] == "1h"


def test_the_feeder_holds_its_window_queues_lost_lines_again_and_cancels_queued_ones(
    migrated_db: str, tmp_path: Path
):
    """Against a real Redis and a model whose lease says it is served but whose queue no
    worker reads: what the feeder sends, records and undoes, pass by pass."""
    from datetime import UTC, datetime

    from farm.batches.feeder import line_job_id
    from farm.depth import queued
    from farm.registry.tables import LeaseRecord, UsageRecord
    from tests.conftest import REDIS_URL

    url = REDIS_URL.rsplit("/", 1)[0] + "/8"
    r = redis.Redis.from_url(url)
    r.flushdb()
    ctx = FarmContext(Settings(home=tmp_path, broker_url=url, database_url=migrated_db))
    with transaction(migrated_db) as s:
        queries.add_model(s, name=MODEL, path="/models/tiny.gguf", n_ctx=512)
        queries.register_worker(s, worker_id="w@x", host="x", pid=1, device="cpu", versions={})
        s.add(
            LeaseRecord(
                worker_id="w@x",
                model=MODEL,
                device="cpu",
                expires_at=datetime.now(UTC) + timedelta(hours=1),
            )
        )
    path = tmp_path / "b.jsonl"
    path.write_text("\n".join(line(f"q{i}") for i in range(5)))
    batch, _ = batches.submit(path, ctx=ctx)
    feeder = Feeder(ctx, window=2)
    try:

        def lines() -> list[tuple[int, str, int, str | None]]:
            with transaction(migrated_db) as s:
                return [
                    (x.line, x.status, x.attempts, x.job_id)
                    for x in s.scalars(select(BatchLineRecord).order_by(BatchLineRecord.line))
                ]

        def usage(job_ids: list[str | None]) -> list[str]:
            with transaction(migrated_db) as s:
                return list(
                    s.scalars(select(UsageRecord.status).where(UsageRecord.job_id.in_(job_ids)))
                )

        assert feeder.step() == 2 and feeder.step() == 0  # the window is full
        first = lines()
        assert [x[1] for x in first] == ["queued", "queued", "pending", "pending", "pending"]
        assert [x[3] for x in first[:2]] == [line_job_id(batch.id, n, 1) for n in (1, 2)]
        assert queued(ctx, MODEL) == 2  # Redis holds the window, not the batch
        assert usage([x[3] for x in first[:2]]) == ["queued", "queued"]  # rows with the lines

        # The broker loses both messages; recovery expires their rows (recovery.py).
        r.delete(*r.keys("farm.model.*"))
        with transaction(migrated_db) as s:
            s.execute(
                update(UsageRecord)
                .where(UsageRecord.job_id.in_([x[3] for x in first[:2]]))
                .values(status="expired")
            )
        feeder.step()  # both lines go back to pending and are sent again: attempt 2
        again = lines()
        assert [x[1:3] for x in again[:2]] == [("queued", 2), ("queued", 2)]
        assert [x[3] for x in again[:2]] == [line_job_id(batch.id, n, 2) for n in (1, 2)]
        assert queued(ctx, MODEL) == 2

        # Cancel: the pending lines at once; the queued lines' jobs through the feeder.
        batches.cancel(batch.id, ctx=ctx)
        for _ in range(3):
            feeder.step()
        ended = batches.get(batch.id, ctx=ctx)
        assert ended.status == "cancelled" and ended.counts == {"cancelled": 5}
        assert usage([x[3] for x in again[:2]]) == ["cancelled", "cancelled"]
    finally:
        r.flushdb()


def test_a_model_that_is_not_a_name_is_a_bad_line_not_a_crash(ctx: FarmContext, tmp_path: Path):
    path = tmp_path / "odd.jsonl"
    path.write_text(line("m", model={"name": MODEL}) + "\n")
    with pytest.raises(BatchFileError) as e:
        batches.submit(path, ctx=ctx)
    assert e.value.errors == ["1: body.model: 'model' is required: one of GET /v1/models"]


def test_a_line_past_max_prompt_chars_is_a_bad_line_and_a_bulk_item_its_own_error(
    ctx: FarmContext, tmp_path: Path
):
    ctx.settings.max_prompt_chars = 2000
    long = "x" * 2001
    path = tmp_path / "long.jsonl"
    embed = {"custom_id": "e", "url": "/v1/embeddings", "body": {"model": MODEL, "input": long}}
    path.write_text(
        "\n".join(
            [line("ok"), line("long", messages=[{"role": "user", "content": long}]),
             json.dumps(embed)]
        )
    )  # fmt: skip
    with pytest.raises(BatchFileError) as e:
        batches.submit(path, ctx=ctx)
    assert [error.split(": ", 2)[:2] for error in e.value.errors] == [
        ["2", "body.messages"],
        ["3", "body.input"],
    ]
    assert "2,001 characters of text" in e.value.errors[0]
    assert n_batches(ctx) == 0

    from farm.enqueue import submit_many

    results = submit_many(
        [{"model": MODEL, "prompt": long}, {"model": MODEL, "prompt": "short"}], ctx=ctx
    )
    assert [type(r).__name__ for r in results] == ["InvalidRequest", "NoLiveWorker"]
    assert "invalid 'prompt': 2,001 characters" in str(results[0])


def test_a_feeder_stopped_with_sigterm_gives_back_its_lock(migrated_db: str, tmp_path: Path):
    """A service manager stops `farm batch feeder` with SIGTERM: it ends its pass, gives
    the lock back and exits 0, rather than leave the next feeder to wait out the lock's
    15 s."""
    import os
    import signal
    import subprocess
    import sys

    from tests.conftest import REDIS_URL

    url = REDIS_URL.rsplit("/", 1)[0] + "/8"
    r = redis.Redis.from_url(url)
    r.flushdb()
    env = {
        **os.environ,
        "FARM_HOME": str(tmp_path),
        "FARM_BROKER_URL": url,
        "FARM_DATABASE_URL": migrated_db,
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "farm.cli", "batch", "feeder"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 60
        while not r.exists(BATCH_FEEDER_LOCK):
            assert proc.poll() is None, proc.communicate()[1]
            assert time.monotonic() < deadline, "the feeder never took its lock"
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        assert not r.exists(BATCH_FEEDER_LOCK)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()
        r.flushdb()
