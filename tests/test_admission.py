"""Admission at submit: a model's queue is bounded (FARM_MAX_QUEUED); past the bound a
submit is refused with the numbers and nothing is queued."""

from __future__ import annotations

import pytest

import farm
from farm.context import get_context, reset_context
from farm.depth import queued
from farm.queue import rejections_key
from tests.conftest import MODEL, fill_slots

pytestmark = pytest.mark.e2e


def test_a_full_queue_refuses_the_next_job_with_the_numbers_and_queues_nothing(
    farm_client, monkeypatch
):
    blockers = fill_slots(max_tokens=60)  # every slot busy: new jobs wait in the queue
    monkeypatch.setenv("FARM_MAX_QUEUED", "3")
    reset_context()
    try:
        waiting = [
            farm.submit(f"w{i}", model=MODEL, max_tokens=1, priority="low") for i in range(3)
        ]
        with pytest.raises(farm.QueueFull, match=r"has 3 jobs queued.*FARM_MAX_QUEUED=3"):
            farm.submit("one too many", model=MODEL, max_tokens=1)
        results = farm.submit_many([{"model": MODEL, "prompt": "bulk", "max_tokens": 1}] * 2)
        assert [type(r).__name__ for r in results] == ["QueueFull", "QueueFull"]
        assert queued(get_context(), MODEL) == 3
        refused = get_context().redis.get(rejections_key(MODEL, "queue_full"))
        assert int(refused or 0) >= 3  # farm_rejections_total{reason="queue_full"}
    finally:
        monkeypatch.undo()
        farm_client.activate()
    for job in [*blockers, *waiting]:
        job.result(timeout=120)
