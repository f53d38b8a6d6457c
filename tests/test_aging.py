"""Bounded waits: a low job behind a long run of high jobs moves up once it has waited
FARM_MAX_WAIT_LOW, instead of starving."""

from __future__ import annotations

import pytest
from sqlalchemy import select

import farm
from farm.admission.aging import age_queues
from farm.context import get_context
from farm.queue import PRIORITIES, priority_list_key
from farm.registry import transaction
from farm.registry.tables import UsageRecord
from tests.conftest import MODEL, own_farm

pytestmark = pytest.mark.e2e


@pytest.fixture
def aging_farm(redis_url, tmp_path):
    limits = {"FARM_MAX_WAIT_LOW": "2", "FARM_MAX_WAIT_NORMAL": "1"}
    with own_farm(10, tmp_path, "aging@test", "--parallel", "1", env=limits) as f:
        yield f


def test_a_low_job_behind_forty_high_ones_starts_after_its_wait_limit_not_after_them(aging_farm):
    highs = [farm.submit(f"h{i}", model=MODEL, max_tokens=8, priority="high") for i in range(40)]
    low = farm.submit("the low one", model=MODEL, max_tokens=2, priority="low")
    low.result(timeout=120)
    for job in highs:
        job.result(timeout=120)
    with transaction(aging_farm.database_url) as s:
        rows = {
            r.job_id: r
            for r in s.scalars(
                select(UsageRecord).where(UsageRecord.job_id.in_([j.id for j in [*highs, low]]))
            )
        }
    started = rows[low.id].started_at
    after = sum(1 for j in highs if rows[j.id].started_at > started)
    wait = (started - rows[low.id].submitted_at).total_seconds()
    print(f"\nlow job started after {wait:.1f}s, ahead of {after} of 40 high jobs")
    assert after > 0  # without aging it would start after every high job
    assert wait < 2 + 1 + 5  # its limit, a heartbeat, and the jobs then ahead of it


def test_only_jobs_past_their_limit_move_and_only_once(farm_client):
    ctx = get_context()
    # A model nobody serves: its queue keeps what is put there.
    for i in range(3):
        ctx.app.send_task(
            "farm.generate", args=[{"model": "nobody", "prompt": f"{i}"}],
            queue="farm.model.nobody", priority=PRIORITIES["low"], expires=3600,
        )  # fmt: skip
    low, normal, high = (
        priority_list_key("nobody", PRIORITIES[p]) for p in ("low", "normal", "high")
    )
    try:
        assert age_queues(ctx, ["nobody"]) == 0  # 600 s default: too young
        ctx.settings = ctx.settings.model_copy(update={"max_wait_low": 0.0001})
        assert age_queues(ctx, ["nobody"]) == 3
        # Low to normal; they stay there while younger than normal's own limit (120 s).
        assert (ctx.redis.llen(low), ctx.redis.llen(normal), ctx.redis.llen(high)) == (0, 3, 0)
        ctx.settings = ctx.settings.model_copy(update={"max_wait_normal": 0.0001})
        assert age_queues(ctx, ["nobody"]) == 3
        assert (ctx.redis.llen(low), ctx.redis.llen(normal), ctx.redis.llen(high)) == (0, 0, 3)
    finally:
        ctx.redis.delete(low, normal, high)
        farm_client.activate()
