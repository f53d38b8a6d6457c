"""Fair share on real Celery workers: a session arriving behind another's flood is served
long before the flood ends, on the engine's twin (fast, exact lengths) and on the real
Gemma worker; and a dispatcher killed mid-flood loses no job and runs none twice."""

from __future__ import annotations

import functools
import os
import signal
import statistics
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
from celery.contrib.testing.worker import start_worker

import farm
from farm.context import FarmContext, get_context, reset_context
from farm.queue import queue_name
from farm.registry import queries, transaction, upgrade
from farm.registry.tables import UsageRecord
from farm.request import Request
from tests.conftest import MODEL, finished_usage
from workers.heartbeat import Membership
from workers.host import EngineOptions
from workers.models import ModelCache
from workers.spec import ModelSpec
from workers.tasks import JobRunner, register_task
from workers.twin import TwinHost

TWIN = "fairtwin"
SLOTS = 2
STARTS: Counter[str] = Counter()  # job id -> runs started on the twin


class CountingTwin(TwinHost):
    """The twin, counting the runs it starts per job."""

    def start(
        self,
        request: Request,
        *,
        time_limit_s: float | None = None,
        label: str = "",
        streamed: bool = True,
    ) -> Any:
        STARTS[label] += 1
        return super().start(request, time_limit_s=time_limit_s, label=label, streamed=streamed)


@pytest.fixture(scope="module")
def twin(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[FarmContext]:
    """A real Celery worker (2 slots, its heartbeat and leases) on the twin engine."""
    home = tmp_path_factory.mktemp("fair-twin")
    db = f"sqlite:///{home / 'registry.db'}"
    upgrade(db)
    with transaction(db) as s:
        queries.add_model(s, name=TWIN, path=str(home / "no-model.gguf"), n_ctx=4096)
    env = {"FARM_HOME": str(home), "FARM_BROKER_URL": redis_url, "FARM_DATABASE_URL": db}
    with pytest.MonkeyPatch.context() as mp:
        for key, value in env.items():
            mp.setenv(key, value)
        reset_context()
        ctx = get_context()
        options = EngineOptions(slots=SLOTS, threads=1)
        cache = ModelCache(
            [ModelSpec(name=TWIN, path=str(home / "no-model.gguf"))],
            options=options,
            host_factory=functools.partial(CountingTwin, seconds_per_token=0.002),
        )
        membership = Membership(ctx, "fair-twin-worker", "cpu")
        membership.options, membership.cache = options, cache
        membership.begin()
        cache.preload()
        register_task(ctx.app, JobRunner(ctx, "fair-twin-worker", cache))
        try:
            with start_worker(
                ctx.app,
                pool="threads",
                concurrency=SLOTS,
                perform_ping_check=False,
                queues=[queue_name(TWIN)],
                loglevel="WARNING",
            ):
                membership.join("cpu")  # leased, and the model's cap is its 2 slots
                yield ctx
        finally:
            membership.leave()
            cache.close()
            reset_context()


def rows_of(database_url: str, jobs: list[farm.Job]) -> dict[str, UsageRecord]:
    """The jobs' usage rows, once each is written as ended."""
    return {j.id: finished_usage(database_url, j.id)[0] for j in jobs}  # type: ignore[misc]


def flood(model: str, *, floods: int, arrivals: int, gap_s: float, max_tokens: int) -> tuple[
    list[farm.Job], list[farm.Job]
]:  # fmt: skip
    """alice queues `floods` jobs at once; then bob queues `arrivals`, one every gap_s."""
    alice = [
        farm.submit(f"alice {i:03d} " + "a" * 20, model=model, session="alice",
                    max_tokens=max_tokens)
        for i in range(floods)
    ]  # fmt: skip
    bob = []
    for i in range(arrivals):
        time.sleep(gap_s)
        bob.append(farm.submit(f"bob {i:03d} " + "b" * 20, model=model, session="bob",
                               max_tokens=max_tokens))  # fmt: skip
    for job in [*alice, *bob]:
        job.result(timeout=300)
    return alice, bob


def report(label: str, rows: dict[str, UsageRecord], alice: list[Any], bob: list[Any]) -> float:
    """Print both sessions' median queue wait and alice's mean job (start to end); returns
    bob's median wait in mean jobs."""
    wait_a = statistics.median(rows[j.id].queue_wait_ms or 0 for j in alice)
    wait_b = statistics.median(rows[j.id].queue_wait_ms or 0 for j in bob)
    took = statistics.fmean(
        (rows[j.id].finished_at - rows[j.id].started_at).total_seconds() * 1000  # type: ignore[operator]
        for j in alice
    )
    print(f"\n{label}: median queue wait alice {wait_a:.0f} ms, bob {wait_b:.0f} ms; "
          f"mean job {took:.0f} ms")  # fmt: skip
    return wait_b / max(took, 1.0)


def test_on_the_twin_a_session_behind_a_flood_is_served_before_the_flood_ends(twin):
    alice, bob = flood(TWIN, floods=60, arrivals=6, gap_s=0.1, max_tokens=30)
    rows = rows_of(twin.database_url, [*alice, *bob])
    last_alice = max(rows[j.id].started_at for j in alice)  # type: ignore[type-var]
    assert all(rows[j.id].finished_at < last_alice for j in bob)  # type: ignore[operator]
    assert report("twin", rows, alice, bob) <= 3  # jobs, where alice waits about 15


DISPATCHER = """
import sys
from farm.context import get_context
from farm.fair import held
r = get_context().broker_redis
while True:
    held.dispatch(r, sys.argv[1], 1)
"""


def test_a_dispatcher_killed_mid_flood_loses_no_job_and_runs_none_twice(twin):
    STARTS.clear()
    jobs = [
        farm.submit(f"{who} {i}", model=TWIN, session=who, max_tokens=20)
        for i in range(60)
        for who in ("alice", "bob")
    ]
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    for _ in range(3):  # killed three times at whatever point it has reached
        proc = subprocess.Popen([sys.executable, "-c", DISPATCHER, TWIN], env=env)
        time.sleep(1.0)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    for job in jobs:
        assert job.result(timeout=120).text  # none lost
    assert all(STARTS[j.id] == 1 for j in jobs)  # none run twice
    ended = [finished_usage(twin.database_url, j.id) for j in jobs]  # the rows come just after
    assert all([row.status for row in rows] == ["succeeded"] for rows in ended)  # type: ignore[attr-defined]


@pytest.mark.e2e
def test_on_gemma_a_session_behind_a_flood_is_served_before_the_flood_ends(farm_client):
    alice, bob = flood(MODEL, floods=64, arrivals=4, gap_s=0.25, max_tokens=8)
    rows = rows_of(farm_client.database_url, [*alice, *bob])
    starts = sorted(rows[j.id].started_at for j in alice)  # type: ignore[type-var]
    assert all(rows[j.id].started_at < starts[-1] for j in bob)  # type: ignore[operator]
    for j in bob:
        # Whatever the machine's pace: alice's jobs that started between this job's submit
        # and its start, about 60 without fair share; with it, the few queued (a quarter of
        # the 8 slots) and her turns between bob's own earlier jobs.
        row = rows[j.id]
        overtaking = sum(1 for t in starts if row.submitted_at < t < row.started_at)  # type: ignore[operator]
        assert overtaking <= 8, overtaking
    report("gemma", rows, alice, bob)
