"""The registry on SQLite and PostgreSQL: migrations, models, leases, usage written once."""

from datetime import UTC, datetime, timedelta

import pytest
from alembic import command
from sqlalchemy import func, select, update

from farm.errors import ModelExists, UnknownModel
from farm.registry import queries, transaction
from farm.registry.db import alembic_config, get_engine
from farm.registry.tables import LeaseRecord, UsageRecord


def test_migrations_match_the_tables(migrated_db):
    cfg = alembic_config(migrated_db)
    with get_engine(migrated_db).connect() as conn:
        cfg.attributes["connection"] = conn
        command.check(cfg)  # raises when the tables and migrations disagree


def test_migrations_downgrade_and_upgrade_again(migrated_db):
    cfg = alembic_config(migrated_db)
    with get_engine(migrated_db).begin() as conn:
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, "base")
        command.upgrade(cfg, "head")


def test_models_are_added_listed_and_removed(migrated_db):
    with transaction(migrated_db) as s:
        queries.add_model(s, name="gemma", path="/m/g.gguf", n_ctx=2048, chat_format="gemma")
        queries.add_model(s, name="alpha", path="/m/a.gguf")
    with transaction(migrated_db) as s:
        assert [m.name for m in queries.list_models(s)] == ["alpha", "gemma"]
        assert queries.get_model(s, "gemma").n_ctx == 2048
    with transaction(migrated_db) as s:
        queries.remove_model(s, "alpha")
    with transaction(migrated_db) as s, pytest.raises(UnknownModel, match="known: gemma"):
        queries.get_model(s, "alpha")


def test_adding_a_model_twice_says_how_to_fix_it(migrated_db):
    with transaction(migrated_db) as s:
        queries.add_model(s, name="gemma", path="/m/g.gguf")
    with transaction(migrated_db) as s, pytest.raises(ModelExists, match="farm models remove"):
        queries.add_model(s, name="gemma", path="/m/other.gguf")


def _register(url, worker_id="w1", model="gemma", ttl=30.0):
    with transaction(url) as s:
        queries.register_worker(s, worker_id=worker_id, host="h", pid=1, device="cpu", versions={})
        queries.set_leases(
            s, worker_id=worker_id, device="cpu", leases=[queries.LeaseSpec(model)], ttl=ttl
        )


def test_a_lease_is_live_until_it_expires_then_the_worker_is_lost(migrated_db):
    _register(migrated_db)
    with transaction(migrated_db) as s:
        assert [lease.worker_id for lease in queries.live_leases(s, "gemma")] == ["w1"]
        assert queries.heartbeat(s, worker_id="w1", ttl=30) == 1
    with transaction(migrated_db) as s:
        past = datetime.now(UTC) - timedelta(seconds=1)
        s.execute(update(LeaseRecord).values(expires_at=past))
    with transaction(migrated_db) as s:
        assert queries.live_leases(s, "gemma") == []
        for job in ("j8", "j9"):
            queries.record_started(
                s, job_id=job, session="a", model="gemma", priority="normal",
                worker_id="w1", submitted_at=datetime.now(UTC),
            )  # fmt: skip
        assert queries.claim_lost_workers(s) == [("w1", ["j8", "j9"])]
        assert queries.claim_lost_workers(s) == []  # claimed once
        assert queries.list_workers(s)[0].state == "lost"


def test_jobs_of_a_lost_worker_put_back_in_their_queues_say_queued_again(migrated_db):
    now = datetime.now(UTC)
    with transaction(migrated_db) as s:
        for job, worker in (("j1", "w1"), ("j2", "w1"), ("j3", "w1"), ("j4", "w2")):
            queries.record_started(
                s, job_id=job, session="a", model="gemma", priority="normal",
                worker_id=worker, submitted_at=now,
            )  # fmt: skip
        # Meanwhile j2 ended on w1, and j3 was started again by w2.
        queries.record_finished(s, job_id="j2", status="succeeded", completion_tokens=5)
        queries.record_started(
            s, job_id="j3", session="a", model="gemma", priority="normal",
            worker_id="w2", submitted_at=now,
        )  # fmt: skip
    with transaction(migrated_db) as s:
        queries.requeued(s, worker_id="w1", job_ids={"j1", "j2", "j3", "j4"})
    with transaction(migrated_db) as s:
        found = {j: queries.get_usage(s, j) for j in ("j1", "j2", "j3", "j4")}
        states = {j: (r.status, r.worker_id) for j, r in found.items() if r is not None}
        assert states == {
            "j1": ("queued", None),
            "j2": ("succeeded", "w1"),
            "j3": ("running", "w2"),
            "j4": ("running", "w2"),
        }
        assert found["j1"] is not None and found["j1"].started_at is None
        running = queries.running_jobs(s)
        assert {w: sorted(jobs) for w, jobs in running.items()} == {"w2": ["j3", "j4"]}


def test_a_clean_stop_drops_the_leases(migrated_db):
    _register(migrated_db)
    with transaction(migrated_db) as s:
        queries.release_worker(s, worker_id="w1")
    with transaction(migrated_db) as s:
        assert queries.live_leases(s) == []
        assert queries.list_workers(s)[0].state == "stopped"


def test_usage_is_written_once_per_job_even_when_delivered_twice(migrated_db):
    now = datetime.now(UTC)
    args = {"job_id": "j1", "session": "alice", "model": "gemma", "priority": "high"}
    with transaction(migrated_db) as s:
        queries.record_queued(s, submitted_at=now, **args)
    for tokens, before in ((10, None), (99, "succeeded")):
        # The second delivery learns the job already ended and must not overwrite it.
        with transaction(migrated_db) as s:
            assert queries.record_started(s, worker_id="w1", submitted_at=now, **args) == before
            queries.record_finished(
                s, job_id="j1", status="succeeded", prompt_tokens=3, completion_tokens=tokens
            )
    with transaction(migrated_db) as s:
        assert s.scalar(select(func.count()).select_from(UsageRecord)) == 1
        row = queries.get_usage(s, "j1")
        assert row is not None
        assert (row.status, row.completion_tokens, row.worker_id) == ("succeeded", 10, "w1")


def test_a_job_the_client_never_recorded_still_gets_one_usage_row(migrated_db):
    now = datetime.now(UTC)
    args = {"job_id": "j2", "session": "s", "model": "gemma", "priority": "normal"}
    with transaction(migrated_db) as s:
        assert queries.record_started(s, worker_id="w1", submitted_at=now, **args) is None
        queries.record_finished(s, job_id="j2", status="failed", error="boom")
    with transaction(migrated_db) as s:
        row = queries.get_usage(s, "j2")
        assert row is not None and row.status == "failed" and row.error == "boom"


def test_usage_totals_per_session_and_model(migrated_db):
    now = datetime.now(UTC)
    with transaction(migrated_db) as s:
        for i, (session, status, tokens) in enumerate(
            [("alice", "succeeded", 5), ("alice", "succeeded", 7), ("bob", "failed", 0)]
        ):
            queries.record_queued(
                s,
                job_id=f"j{i}",
                session=session,
                model="gemma",
                priority="normal",
                submitted_at=now,
            )
            queries.record_finished(
                s, job_id=f"j{i}", status=status, prompt_tokens=2, completion_tokens=tokens
            )
    with transaction(migrated_db) as s:
        totals = {t.session: t for t in queries.usage_totals(s)}
        alice_only = queries.usage_totals(s, session="alice")
    assert totals["alice"].jobs == 2 and totals["alice"].completion_tokens == 12
    assert totals["alice"].succeeded == 2 and totals["bob"].failed == 1
    assert [t.session for t in alice_only] == ["alice"]


def test_rows_left_queued_long_past_their_expiry_end_as_expired_with_the_reason(migrated_db):
    now = datetime.now(UTC)
    with transaction(migrated_db) as s:
        for job, age in (("old", 7200), ("fresh", 10)):
            queries.record_queued(
                s, job_id=job, session="a", model="gemma", priority="low",
                submitted_at=now - timedelta(seconds=age),
            )  # fmt: skip
    with transaction(migrated_db) as s:
        expired = queries.expire_stale_queued(
            s, older_than=now - timedelta(seconds=3600), reason="lost with the broker"
        )
    assert expired == ["old"]
    with transaction(migrated_db) as s:
        old, fresh = queries.get_usage(s, "old"), queries.get_usage(s, "fresh")
        assert old is not None and (old.status, old.error) == ("expired", "lost with the broker")
        assert fresh is not None and fresh.status == "queued"
