"""A broker that fails over (farm/failover.py): the reconciliation on its own, on a real
`redis-server` reached through a real sentinel: a broker whose replication id changed,
holding some jobs' messages in each place a message can be, and missing one.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from farm import failover
from farm.config import Settings
from farm.context import FarmContext
from farm.fair import held
from farm.queue import (
    BROKER_EPOCH_KEY,
    BROKER_RECONCILE_LOCK,
    FAIR_HEADER,
    TASK_NAME,
    fair_cap_key,
    queue_name,
)
from farm.registry import queries, transaction, upgrade
from farm.request import make_request
from tests.sentinel import SentinelSet

pytestmark = pytest.mark.e2e


def _send(ctx: FarmContext, job_id: str, priority: int, **options: Any) -> None:
    ctx.app.send_task(TASK_NAME, args=[{}], task_id=job_id, queue=queue_name("m"),
                      priority=priority, **options)  # fmt: skip


def test_the_jobs_a_changed_broker_lost_end_expired_and_the_others_stay_queued(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setattr(failover, "RECHECK_AFTER_S", 0.0)
    servers = SentinelSet(tmp_path, replica=False).start()
    db = f"sqlite:///{tmp_path / 'registry.db'}"
    upgrade(db)
    ctx = FarmContext(Settings(home=tmp_path, broker_url=servers.url(), database_url=db))
    ids = {name: str(uuid.uuid4()) for name in ("listed", "held", "delivered", "lost", "starts")}
    try:
        with transaction(db) as s:
            for job_id in ids.values():
                queries.record_queued(s, job_id=job_id, session="s", model="m",
                                      priority="normal", submitted_at=datetime.now(UTC))  # fmt: skip
        _send(ctx, ids["listed"], 5)  # on its priority list
        ctx.broker_redis.set(fair_cap_key("m"), 1)  # the list is full: the next job waits
        request = make_request({"model": "m", "prompt": "x", "max_tokens": 1, "session": "s"})
        _send(ctx, ids["held"], 5, headers={FAIR_HEADER: held.header(request, 5, 1.0, 2.0)})
        _send(ctx, ids["delivered"], 0)
        worker = ctx.app.connection_for_write()  # a worker holding it, unacknowledged
        assert worker.default_channel.basic_get(queue_name("m"), no_ack=False) is not None
        ctx.broker_redis.set(BROKER_EPOCH_KEY, "0123456789abcdef-an-older-master")

        watch = failover.BrokerWatch(ctx)
        assert watch.step() == []  # the first look: two jobs not found
        assert watch.pending is not None
        assert set(watch.pending.missing) == {ids["lost"], ids["starts"]}
        with transaction(db) as s:  # meanwhile a worker starts one (it was on its way)
            queries.record_started(s, job_id=ids["starts"], session="s", model="m",
                                   priority="normal", worker_id="w",
                                   submitted_at=datetime.now(UTC))  # fmt: skip
        assert watch.step() == [ids["lost"]]  # the second look: only the lost one ends

        with transaction(db) as s:
            rows = {name: queries.get_usage(s, job_id) for name, job_id in ids.items()}
        statuses = {name: row.status for name, row in rows.items() if row is not None}
        assert statuses == {"listed": "queued", "held": "queued", "delivered": "queued",
                            "lost": "expired", "starts": "running"}  # fmt: skip
        error = rows["lost"].error if rows["lost"] is not None else ""
        assert error and error.startswith("lost in a broker failover") and "01234567 ->" in error
        epoch = ctx.broker_redis.info("replication")["master_replid"]
        assert ctx.broker_redis.get(BROKER_EPOCH_KEY) == epoch
        assert ctx.broker_redis.get(BROKER_RECONCILE_LOCK) is None
        assert watch.step() == [] and watch.pending is None  # the same broker: nothing to do
        worker.close()
    finally:
        ctx.app.close()
        servers.stop()
