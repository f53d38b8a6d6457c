"""Quotas reserved at submit: exact under concurrency, settled when jobs end, released when
they never run; the CLI that sets and shows them."""

from __future__ import annotations

import json
import threading

import pytest
from sqlalchemy import select

import farm
from farm.admission.quotas import reservation, standing
from farm.context import get_context
from farm.registry import transaction
from farm.registry.tables import UsageRecord
from tests.conftest import MODEL, fill_slots, finished_usage

pytestmark = pytest.mark.e2e


def set_quota(f, session: str, *args: str) -> None:
    r = f.farm("quota", "set", session, *args)
    assert r.returncode == 0, r.stderr
    get_context().quotas.clear()  # this process's one-second cache of the limits


def test_fifty_concurrent_submitters_never_overshoot_the_tokens_per_day(farm_client):
    request = farm.Request(model=MODEL, prompt="q", stopping={"max_tokens": 2}, session="q50")
    per_job = reservation(request)
    set_quota(farm_client, "q50", "--tokens-per-day", str(10 * per_job))
    accepted: list[farm.Job] = []
    refused: list[Exception] = []
    lock = threading.Lock()

    def one() -> None:
        try:
            job = farm.submit("q", model=MODEL, max_tokens=2, session="q50")
        except farm.QuotaExceeded as e:
            with lock:
                refused.append(e)
            return
        with lock:
            accepted.append(job)

    threads = [threading.Thread(target=one) for _ in range(50)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert accepted and refused and len(accepted) + len(refused) == 50
    assert "over its quota of" in str(refused[0]) and "resets at 00:00 UTC" in str(refused[0])
    for job in accepted:
        job.result(timeout=120)
        finished_usage(farm_client.database_url, job.id)
    with transaction(farm_client.database_url) as s:
        rows = list(s.scalars(select(UsageRecord).where(UsageRecord.session == "q50")))
    used = sum(r.prompt_tokens + r.completion_tokens for r in rows)
    assert used <= 10 * per_job  # never past the limit, however many raced for it
    now = standing(get_context(), "q50")
    assert now == {"used_today": used, "reserved": 0, "in_flight": 0}  # all settled


def test_max_queued_counts_jobs_in_flight_and_a_cancel_gives_its_place_back(farm_client):
    set_quota(farm_client, "q2", "--max-queued", "2")
    blockers = fill_slots(max_tokens=60)  # jobs of q2 wait in the queue
    first = farm.submit("a", model=MODEL, max_tokens=1, session="q2")
    farm.submit("b", model=MODEL, max_tokens=1, session="q2")
    with pytest.raises(farm.QuotaExceeded, match="has 2 jobs queued or running"):
        farm.submit("c", model=MODEL, max_tokens=1, session="q2")
    assert first.cancel()
    third = farm.submit("c", model=MODEL, max_tokens=1, session="q2")  # its place came back
    for job in [*blockers, third]:
        job.result(timeout=120)


def test_quota_commands_set_list_remove_and_refuse_bad_values(farm_client):
    set_quota(farm_client, "cli-q", "--tokens-per-day", "500", "--max-queued", "3")
    listed = json.loads(farm_client.farm("quota", "list", "--json").stdout)
    [q] = [q for q in listed if q["session"] == "cli-q"]
    assert (q["tokens_per_day"], q["max_queued"], q["used_today"]) == (500, 3, 0)
    bad = farm_client.farm("quota", "set", "cli-q", "--tokens-per-day", "-5")
    assert bad.returncode == 2 and "'--tokens-per-day'" in bad.stderr
    assert "greater than or equal to 1" in bad.stderr
    bad = farm_client.farm("quota", "set", "cli-q", "--max-queued", "lots")
    assert bad.returncode == 2 and "'--max-queued'" in bad.stderr
    assert "valid integer" in bad.stderr
    assert farm_client.farm("quota", "remove", "cli-q").returncode == 0
    gone = farm_client.farm("quota", "remove", "cli-q")
    assert gone.returncode == 1 and "session 'cli-q' has no quota" in gone.stderr


def test_a_failed_job_gives_back_its_reservation_and_counts_nothing(farm_client):
    set_quota(farm_client, "q-fail", "--tokens-per-day", "1000000")
    job = farm.submit("word " * 6000, model=MODEL, max_tokens=4, session="q-fail")
    with pytest.raises(farm.JobFailed, match="holds 4096"):
        job.result(timeout=60)
    finished_usage(farm_client.database_url, job.id)
    assert standing(get_context(), "q-fail") == {"used_today": 0, "reserved": 0, "in_flight": 0}


def test_fifty_concurrent_submitters_never_pass_a_rate_limit_and_are_told_when_to_retry(
    farm_client,
):
    set_quota(farm_client, "r60", "--requests-per-minute", "60")
    accepted: list[farm.Job] = []
    refused: list[farm.RateLimited] = []
    lock = threading.Lock()

    def two() -> None:
        for _ in range(2):
            try:
                job = farm.submit("r", model=MODEL, max_tokens=1, session="r60")
            except farm.RateLimited as e:
                with lock:
                    refused.append(e)
                continue
            with lock:
                accepted.append(job)

    threads = [threading.Thread(target=two) for _ in range(50)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(accepted) == 60 and len(refused) == 40  # 100 tries, the minute holds 60
    assert all(0 < e.retry_after <= 60 for e in refused)
    assert "over its rate limit of 60 requests a minute" in str(refused[0])
    assert isinstance(refused[0], farm.QuotaExceeded)  # callers catching quotas catch it too
    # Each was told what remained after it: 59 down to 0, once each.
    assert sorted(job.rate.requests_remaining for job in accepted) == list(range(60))
    assert {job.rate.requests_limit for job in accepted} == {60}
    for job in accepted:
        job.cancel()


def test_a_tokens_per_minute_limit_counts_prompt_and_max_tokens(farm_client):
    set_quota(farm_client, "t100", "--tokens-per-minute", "100")
    first = farm.submit("hi", model=MODEL, max_tokens=40, session="t100")  # about 41 tokens
    assert first.rate.tokens_remaining == 100 - 41 and first.rate.requests_limit is None
    farm.submit("hi", model=MODEL, max_tokens=40, session="t100")
    with pytest.raises(farm.RateLimited, match="100 tokens a minute") as over:
        farm.submit("hi", model=MODEL, max_tokens=40, session="t100")
    assert 50 < over.value.retry_after <= 60  # when the first of the minute ages out
    with pytest.raises(farm.RateLimited, match="on its own"):
        farm.submit("hi", model=MODEL, max_tokens=200, session="t100")
    assert farm_client.farm("quota", "set", "t100", "--tpm", "0").returncode == 0
    get_context().quotas.clear()
    farm.submit("hi", model=MODEL, max_tokens=40, session="t100").result(timeout=120)
    listed = json.loads(farm_client.farm("quota", "list", "--json").stdout)
    [q] = [q for q in listed if q["session"] == "t100"]
    assert q["tokens_per_minute"] is None  # 0 removed it
