"""The priority proof: with every slot of the worker busy, 5 low then 5 high jobs are
queued, and every high job starts before any low one. A job sent with no priority waits
behind high ones. The worker holds no job it cannot start, so nothing queued waits inside
it where a later, higher job could not overtake it.
"""

import pytest
from sqlalchemy import select

import farm
from farm.context import get_context
from farm.depth import queue_depths
from farm.queue import TASK_NAME, queue_name
from farm.registry import transaction
from farm.registry.tables import UsageRecord
from farm.status import job_status
from tests.conftest import LIVE_SLOTS, MODEL

pytestmark = pytest.mark.e2e


def test_high_priority_jobs_overtake_queued_low_ones_while_every_slot_is_busy(farm_client):
    # Busy jobs of different lengths free their slots one at a time, so the queued jobs
    # start one by one in the order they are taken from the queue.
    busy = [
        farm.submit(f"Tell me a long story, part {i}.", model=MODEL, max_tokens=60 + 30 * i)
        for i in range(LIVE_SLOTS)
    ]
    for job in busy:
        next(job.stream(timeout=120))
    lows = [farm.submit(f"low {i}", model=MODEL, priority="low", max_tokens=2) for i in range(5)]
    # A message that names no priority must not jump the queue: it gets "normal".
    request = farm.Request(model=MODEL, prompt="no priority", stopping={"max_tokens": 2})
    plain = get_context().app.send_task(
        TASK_NAME, args=[request.to_wire()], queue=queue_name(MODEL)
    )
    highs = [farm.submit(f"high {i}", model=MODEL, priority="high", max_tokens=2) for i in range(5)]

    depth = queue_depths(get_context(), [MODEL])[MODEL]
    assert depth == {"high": 5, "normal": 1, "low": 5}
    assert job_status(highs[0].id)["position"] == 1
    assert job_status(lows[-1].id)["position"] == 11

    for job in [*busy, *lows, *highs]:
        job.result(timeout=120)
    plain.get(timeout=60)

    with transaction(farm_client.database_url) as s:
        started = {
            row.job_id: row.started_at
            for row in s.scalars(
                select(UsageRecord).where(
                    UsageRecord.job_id.in_([j.id for j in lows + highs] + [plain.id])
                )
            )
        }
    last_high = max(started[j.id] for j in highs)
    first_low = min(started[j.id] for j in lows)
    assert last_high < started[plain.id] < first_low
