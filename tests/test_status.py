"""How `farm status` names a worker's state, and where it reads the queues."""

import pytest
import redis

from farm.admission.aging import age_queues
from farm.config import Settings
from farm.context import FarmContext
from farm.depth import queue_depths, queue_position, queued
from farm.queue import PRIORITIES
from farm.registry import upgrade
from farm.status import _shown_state


@pytest.mark.parametrize(
    ("state", "live_lease", "stale", "shown"),
    [
        ("ready", True, False, "ready"),
        ("busy", True, False, "busy"),
        ("ready", False, True, "lost"),  # leases expired, not reaped yet
        ("busy", False, False, "lost"),
        ("starting", False, False, "starting"),  # still loading, still beating
        ("starting", False, True, "lost"),  # died while loading
        ("lost", False, True, "lost"),
    ],
)
def test_a_workers_shown_state(state, live_lease, stale, shown):
    assert _shown_state(state, live_lease, stale) == shown


def test_queues_are_read_on_the_broker_when_results_live_on_another_redis(redis_url, tmp_path):
    """Queue depth, a job's place and aging look at kombu's lists on the broker, not at
    the result store (FARM_RESULT_URL)."""
    base = redis_url.rsplit("/", 1)[0]
    broker, results = f"{base}/6", f"{base}/5"
    database = f"sqlite:///{tmp_path / 'registry.db'}"
    upgrade(database)
    settings = Settings(home=tmp_path, broker_url=broker, result_url=results, database_url=database)
    ctx = FarmContext(settings)
    for url in (broker, results):
        redis.Redis.from_url(url).flushdb()
    try:
        sent = []
        for i, priority in enumerate(["high", "low", "low"]):
            message = {"model": "nobody", "prompt": f"{i}"}
            job = ctx.app.send_task(
                "farm.generate", args=[message], queue="farm.model.nobody",
                priority=PRIORITIES[priority], expires=3600,
            )  # fmt: skip
            sent.append(job)
        assert queue_depths(ctx, ["nobody"]) == {"nobody": {"high": 1, "normal": 0, "low": 2}}
        assert queued(ctx, "nobody") == 3
        assert queue_position(ctx, "nobody", sent[2].id) == 3
        ctx.settings = ctx.settings.model_copy(update={"max_wait_low": 0.0001})
        assert age_queues(ctx, ["nobody"]) == 2
        assert queue_depths(ctx, ["nobody"])["nobody"] == {"high": 1, "normal": 2, "low": 0}
    finally:
        for url in (broker, results):
            redis.Redis.from_url(url).flushdb()
