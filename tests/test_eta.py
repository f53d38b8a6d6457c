"""Queue position and the estimated start of a queued job, checked against when it really
started on a one-slot worker with a backlog."""

from __future__ import annotations

import pytest

import farm
from farm.registry import queries, transaction
from tests.conftest import MODEL, own_farm

pytestmark = pytest.mark.e2e


@pytest.fixture
def one_slot_farm(redis_url, tmp_path):
    with own_farm(9, tmp_path, "eta@test", "--parallel", "1") as f:
        yield f


def job(i: int) -> farm.Job:
    # Fixed-length jobs: no stop string can end them early, so their durations compare.
    return farm.submit(f"Count slowly: {i}", model=MODEL, max_tokens=24, temperature=0)


def test_a_queued_job_knows_its_position_and_about_when_it_starts(one_slot_farm):
    for i in range(4):  # the estimate learns from the model's recent jobs
        job(i).result(timeout=60)
    backlog = [job(i) for i in range(10)]
    last = backlog[-1]
    place = last.position()
    assert place is not None
    assert place["position"] == sum(place["ahead"].values()) + 1 >= 9
    assert place["ahead"]["high"] == 0 and place["starts_in_s"] is not None
    for j in backlog:
        j.result(timeout=120)
    with transaction(one_slot_farm.database_url) as s:
        row = queries.get_usage(s, last.id)
        assert row is not None and row.started_at is not None
        first = queries.get_usage(s, backlog[0].id)
    assert first is not None and first.started_at is not None
    # The worker was idle: the first of the backlog started as the estimate was made.
    spent = (row.started_at - first.started_at).total_seconds()
    error = abs(place["starts_in_s"] - spent) / max(spent, 0.1)
    print(
        f"\nETA {place['starts_in_s']:.1f}s for position {place['position']}; "
        f"it started {spent:.1f}s later; error {error:.0%}"
    )
    assert error < 1.0  # within a factor of two
    assert last.position() is None  # no longer queued
