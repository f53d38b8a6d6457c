"""Bulk submit on the real farm: each item becomes a Job or its own error; only the valid
ones are queued, each has its registry row and runs once."""

from __future__ import annotations

import pytest
from sqlalchemy import func, select

import farm
from farm.context import get_context, reset_context
from farm.registry import transaction
from farm.registry.tables import UsageRecord
from tests.conftest import MODEL, finished_usage

pytestmark = pytest.mark.e2e


def usage_count(db: str) -> int:
    get_context().flush_rows()
    with transaction(db) as s:
        return int(s.scalar(select(func.count()).select_from(UsageRecord)) or 0)


def test_a_mix_of_valid_and_invalid_items_queues_exactly_the_valid_ones(farm_client):
    before = usage_count(farm_client.database_url)
    results = farm.submit_many(
        [
            {"model": MODEL, "prompt": "one", "max_tokens": 1},
            {"model": MODEL, "prompt": "hot", "temperature": 99},
            {"model": "deepsek", "prompt": "typo"},
            "not a dict",
            {"model": MODEL, "prompt": "long", "max_tokens": 5000},
            {"prompt": "no model: the default one", "max_tokens": 1},
            farm.Request(model=MODEL, prompt="a Request", stopping={"max_tokens": 1}),
        ]
    )
    assert [type(r).__name__ for r in results] == [
        "Job",
        "InvalidRequest",
        "UnknownModel",
        "InvalidRequest",
        "InvalidRequest",
        "Job",
        "Job",
    ]
    assert "'sampling.temperature'" in str(results[1])
    assert "unknown model 'deepsek'" in str(results[2])
    assert "must be a Request or a dict, not str" in str(results[3])
    assert "context 4096" in str(results[4])
    jobs = [r for r in results if isinstance(r, farm.Job)]
    for job in jobs:
        assert job.result(timeout=60).usage.completion_tokens == 1
        [row] = finished_usage(farm_client.database_url, job.id)
        assert row.status == "succeeded"  # type: ignore[attr-defined]
    assert usage_count(farm_client.database_url) == before + 3


def test_forty_jobs_in_one_call_each_run_once_with_one_row(farm_client):
    results = farm.submit_many(
        {"model": MODEL, "prompt": f"n {i}", "max_tokens": 1, "session": "bulk"} for i in range(40)
    )
    assert all(isinstance(r, farm.Job) for r in results)
    assert len({r.id for r in results}) == 40  # type: ignore[union-attr]
    for job in results:
        assert isinstance(job, farm.Job)
        job.result(timeout=120)
        [row] = finished_usage(farm_client.database_url, job.id)
        assert (row.status, row.session, row.completion_tokens) == ("succeeded", "bulk", 1)  # type: ignore[attr-defined]


def test_with_the_broker_unreachable_every_item_says_so_and_nothing_is_recorded(
    farm_client, monkeypatch
):
    before = usage_count(farm_client.database_url)
    monkeypatch.setenv("FARM_BROKER_URL", "redis://127.0.0.1:1/0")
    reset_context()
    try:
        results = farm.submit_many({"model": MODEL, "prompt": f"{i}"} for i in range(3))
    finally:
        monkeypatch.undo()
        farm_client.activate()
    assert [type(r).__name__ for r in results] == ["FarmUnavailable"] * 3
    assert "cannot reach the broker" in str(results[0])
    assert usage_count(farm_client.database_url) == before


def test_a_job_just_submitted_is_found_by_its_own_process_at_once(farm_client):
    job = farm.submit("Hello", model=MODEL, max_tokens=1)
    assert job.status() in ("queued", "running", "succeeded")
    job.result(timeout=60)
