"""Fair share between sessions (farm/fair/) on a real Redis, through farm's real submit and
kombu's real publish, for a model whose lease is live but whose queue nobody consumes: each
test plays the worker's part itself (take the next job off the Celery list, then dispatch,
as a worker does when it takes a job), so the order of service is exact and the tests are
fast. tests/test_fair_share_worker.py shows the same on real workers."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator

import pytest

import farm
from farm.context import FarmContext, get_context, reset_context
from farm.fair import fleet, held
from farm.queue import BATCH_LOW, PRIORITIES, fair_cap_key, priority_list_key
from farm.registry import queries, transaction, upgrade
from farm.registry.queries import LeaseSpec
from tests.conftest import run_cli

MODEL = "idle"
SLOTS = 8
CAP = 2  # jobs of a priority in the Celery queue: a quarter of the live slots
NORMAL = PRIORITIES["normal"]


@pytest.fixture(scope="module")
def idle_farm(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[FarmContext]:
    """A registry where worker 'idle-worker' (8 slots) holds a live lease on model 'idle';
    no Celery worker consumes its queue."""
    home = tmp_path_factory.mktemp("fair-farm")
    db = f"sqlite:///{home / 'registry.db'}"
    upgrade(db)
    with transaction(db) as s:
        queries.add_model(s, name=MODEL, path=str(home / "no-model.gguf"), n_ctx=4096)
        queries.register_worker(
            s, worker_id="idle-worker", host="h", pid=1, device="cpu", versions={}, slots=SLOTS
        )
        queries.set_leases(
            s, worker_id="idle-worker", device="cpu", leases=[LeaseSpec(MODEL)], ttl=3600
        )
    env = {"FARM_HOME": str(home), "FARM_BROKER_URL": redis_url, "FARM_DATABASE_URL": db}
    with pytest.MonkeyPatch.context() as mp:
        for key, value in env.items():
            mp.setenv(key, value)
        reset_context()
        yield get_context()
        reset_context()


@pytest.fixture
def fair(idle_farm: FarmContext) -> Iterator[FarmContext]:
    """The idle farm with nothing queued or held, and its cap written as a worker would."""

    def clean() -> None:
        r = idle_farm.broker_redis
        for key in r.scan_iter("farm:fair:idle:*"):
            r.delete(key)
        for step in range(10):
            r.delete(priority_list_key(MODEL, step))

    clean()
    fleet.refresh(idle_farm, [MODEL])
    yield idle_farm
    clean()


def queued_ids(ctx: FarmContext, step: int = NORMAL) -> list[str]:
    """Job ids in the Celery list of a step, next to run first."""
    raws = ctx.broker_redis.lrange(priority_list_key(MODEL, step), 0, -1)
    return [json.loads(raw)["headers"]["id"] for raw in reversed(raws)]


def take(ctx: FarmContext, step: int = NORMAL) -> str | None:
    """What a worker does: take the next job off the Celery list, then dispatch."""
    raw = ctx.broker_redis.rpop(priority_list_key(MODEL, step))
    fleet.on_take(ctx, MODEL)
    return None if raw is None else json.loads(raw)["headers"]["id"]


def submit(session: str, n: int, *, text: str = "x" * 40, max_tokens: int = 20) -> list[str]:
    return [
        farm.submit(text, model=MODEL, session=session, max_tokens=max_tokens).id for _ in range(n)
    ]


def test_a_flood_waits_held_and_only_the_live_slots_reach_the_celery_queue(fair):
    a = submit("alice", 20)
    assert queued_ids(fair) == a[:CAP]  # the rest is held under alice
    assert held.dispatch(fair.broker_redis, MODEL) == 0  # full: nothing moves
    assert farm.job(a[-1]).position()["position"] == 20  # type: ignore[index]


def test_a_session_arriving_behind_a_flood_gets_the_next_turn(fair):
    a = submit("alice", 20)
    b = submit("bob", 3)
    order = [take(fair) for _ in range(10)]
    # alice's two already queued, then turns alternate: bob is never behind alice's backlog.
    assert order[:CAP] == a[:CAP]
    assert [order.index(j) for j in b] == [3, 5, 7] or [order.index(j) for j in b] == [2, 4, 6]


def test_a_late_session_banks_no_credit_for_the_time_it_was_idle(fair):
    submit("alice", 30)
    for _ in range(20):  # alice served alone for a while
        take(fair)
    b = set(submit("bob", 10))
    served = [take(fair) for _ in range(10)]
    # bob starts level with alice, not 20 jobs behind her: turns alternate.
    assert 4 <= sum(j in b for j in served) <= 6


def test_weights_share_the_queue_in_their_ratio(fair):
    with transaction(fair.database_url) as s:
        queries.set_quota(s, "heavy", tokens_per_day=None, max_queued=None, weight=2.0)
    fair.quotas.clear()
    try:
        fair.broker_redis.set(fair_cap_key(MODEL), 0)  # hold everything while both submit
        heavy, light = set(submit("heavy", 40)), set(submit("light", 40))
        fair.broker_redis.set(fair_cap_key(MODEL), 1)
        held.dispatch(fair.broker_redis, MODEL)
        served = [take(fair) for _ in range(30)]
        assert sum(j in heavy for j in served) in (19, 20, 21)  # 2:1, within a job
        assert sum(j in light for j in served) in (9, 10, 11)
    finally:
        with transaction(fair.database_url) as s:
            queries.remove_quota(s, "heavy")
        fair.quotas.clear()


def test_sessions_asking_for_different_lengths_get_equal_tokens_not_equal_jobs(fair):
    fair.broker_redis.set(fair_cap_key(MODEL), 0)
    long = set(submit("long", 30, text="y" * 400, max_tokens=100))  # 100 + 2 x 100 = 300
    short = set(submit("short", 60, text="y" * 40, max_tokens=10))  # 10 + 2 x 10 = 30
    fair.broker_redis.set(fair_cap_key(MODEL), 1)
    held.dispatch(fair.broker_redis, MODEL)
    served = [take(fair) for _ in range(33)]
    n_long, n_short = sum(j in long for j in served), sum(j in short for j in served)
    assert abs(n_long * 300 - n_short * 30) <= 300  # within one long job
    assert n_short > 5 * n_long


def test_a_high_job_skips_every_held_normal_one(fair):
    submit("alice", 20)
    high = farm.submit("urgent", model=MODEL, session="bob", priority="high", max_tokens=5)
    assert queued_ids(fair, PRIORITIES["high"]) == [high.id]  # dispatched at once
    assert high.position()["position"] == 1  # type: ignore[index]


def test_cancelling_a_held_job_takes_it_out_at_once(fair):
    a = submit("alice", 10)
    job = farm.job(a[5])
    assert job.position()["position"] == 6  # type: ignore[index]
    assert job.cancel() is True
    assert job.status() == "cancelled" and job.position() is None
    assert farm.job(a[6]).position()["position"] == 6  # type: ignore[index]
    order = [take(fair) for _ in range(9)]
    assert a[5] not in order and order == [j for j in a if j != a[5]]


def test_position_counts_the_fair_turns_ahead_not_the_submit_order(fair):
    a = submit("alice", 10)
    [b] = submit("bob", 1)
    # Two of alice's queued, then bob's turn comes before alice's remaining eight.
    assert farm.job(b).position()["position"] in (3, 4)  # type: ignore[index]
    assert farm.job(a[-1]).position()["position"] == 11  # type: ignore[index]


def test_held_jobs_age_into_the_next_priority_like_queued_ones(fair, monkeypatch):
    from farm.admission.aging import age_queues

    a = submit("alice", 5)
    monkeypatch.setattr(fair.settings, "max_wait_normal", 0.2)
    time.sleep(0.3)
    age_queues(fair, [MODEL])
    assert sorted(queued_ids(fair, PRIORITIES["high"])) == sorted(a)  # queued and held alike


DISPATCHER = """
import sys
from farm.context import get_context
from farm.fair import held
r = get_context().broker_redis
while True:
    held.dispatch(r, sys.argv[1], 1)
"""


def test_a_dispatcher_killed_mid_flood_loses_no_job_and_queues_none_twice(fair):
    """Dispatchers in processes of their own, killed with SIGKILL again and again while a
    consumer drains the queue: every job comes out exactly once."""
    r = fair.broker_redis
    jobs = submit("alice", 150) + submit("bob", 150)
    taken: list[str] = []
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    for _ in range(6):
        proc = subprocess.Popen([sys.executable, "-c", DISPATCHER, MODEL], env=env)
        deadline, before = time.monotonic() + 10, len(taken)
        while time.monotonic() < deadline and len(taken) < before + 20:
            raw = r.rpop(priority_list_key(MODEL, NORMAL))  # a consumer, no dispatching
            if raw is not None:
                taken.append(json.loads(raw)["headers"]["id"])
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    while True:  # whatever is left, by the workers' own path: dispatch, take
        fleet.on_take(fair, MODEL)
        raw = r.rpop(priority_list_key(MODEL, NORMAL))
        if raw is None:
            break
        taken.append(json.loads(raw)["headers"]["id"])
    assert Counter(taken) == Counter(jobs)


def test_weight_is_set_and_listed_by_the_quota_cli_and_a_bad_one_is_refused(fair):
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    try:
        assert run_cli(env, "quota", "set", "carol", "--weight", "2").returncode == 0
        listed = json.loads(run_cli(env, "quota", "list", "--json").stdout)
        assert [q["weight"] for q in listed if q["session"] == "carol"] == [2.0]
        table = run_cli(env, "quota", "list").stdout
        assert "weight" in table and "carol" in table
        bad = run_cli(env, "quota", "set", "carol", "--weight", "0")
        assert bad.returncode == 2 and "--weight" in bad.stderr
    finally:
        run_cli(env, "quota", "remove", "carol")


def test_status_and_metrics_show_each_sessions_queued_jobs_and_share(fair):
    from farm.metrics import render
    from farm.status import fleet_status

    submit("alice", 12)
    submit("bob", 3)
    sessions = {row["session"]: row for row in fleet_status(fair)["sessions"]}
    assert (sessions["alice"]["queued"], sessions["bob"]["queued"]) == (12, 3)
    assert sessions["alice"]["weight"] == 1.0
    text = render(fair).decode()
    assert 'farm_session_queued{session="alice"} 12.0' in text
    assert 'farm_session_share{session="bob"}' in text
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    shown = run_cli(env, "status").stdout
    assert "sessions" in shown and "alice" in shown


def test_batch_lines_sent_in_bulk_share_their_own_level_between_sessions(fair):
    def lines(session: str, batch: str) -> list[str]:
        items = [
            {"prompt": "line", "model": MODEL, "session": session, "priority": "low",
             "max_tokens": 5, "stream_tokens": False, "batch": {"id": batch, "line": i + 1}}
            for i in range(10)
        ]  # fmt: skip
        return [job.id for job in farm.submit_many(items)]  # type: ignore[union-attr]

    step = BATCH_LOW
    first, second = set(lines("nightly", "b1")), set(lines("hourly", "b2"))
    assert len(queued_ids(fair, step)) == CAP  # the rest held, as interactive jobs are
    served = [take(fair, step) for _ in range(12)]
    # The second batch's session is not left behind the first's ten lines: turns alternate.
    assert 5 <= sum(j in second for j in served) <= 7 and first | second >= set(served)
