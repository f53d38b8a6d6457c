"""The rules of a job's run key (farm/stream.py's Fenced), on a real Redis: one run holds a
job; a write is refused once the job is cancelled or another run holds it; a key lost to a
Redis restart is taken back by the run that had it; a run that ended the job leaves a
marker a cut-off run cannot take over, and a new delivery can."""

from __future__ import annotations

import uuid

import pytest
import redis

from farm.queue import cancel_key, run_key, stream_key
from farm.stream import CANCELLED_, LOST, WRITTEN, Fenced, free_runs


@pytest.fixture
def r(redis_url: str) -> redis.Redis:
    return redis.Redis.from_url(redis_url, decode_responses=True)


def runs(r: redis.Redis) -> tuple[str, Fenced, Fenced]:
    job = uuid.uuid4().hex
    return job, Fenced(r, job, "A", 5), Fenced(r, job, "B", 5)


def test_one_run_holds_a_job_and_the_other_cannot_write(r):
    job, a, b = runs(r)
    assert a.claim() and not b.claim()
    assert a.publish("token", ttl=60, text="hi") == WRITTEN
    assert b.publish("token", ttl=60, text="no") == LOST
    assert [f["text"] for _, f in r.xrange(stream_key(job))] == ["hi"]
    assert 0 < r.ttl(stream_key(job)) <= 60


def test_a_cancelled_job_takes_no_more_text_but_its_cancelled_event(r):
    job, a, _ = runs(r)
    assert a.claim()
    r.set(cancel_key(job), "1")
    assert a.publish("token", ttl=60, text="late") == CANCELLED_
    assert a.check() == CANCELLED_
    assert a.publish("cancelled", ttl=60) == WRITTEN
    assert [f["kind"] for _, f in r.xrange(stream_key(job))] == ["cancelled"]


def test_a_run_key_lost_to_a_redis_restart_is_taken_back_by_its_run(r):
    job, a, b = runs(r)
    assert a.claim()
    r.delete(run_key(job))  # what a restart without the key leaves
    assert a.publish("token", ttl=60, text="on") == WRITTEN
    assert r.get(run_key(job)) == "A" and not b.claim()


def test_a_run_cut_off_while_another_ran_the_job_cannot_take_it_back(r):
    job, a, b = runs(r)
    assert a.claim()
    r.delete(run_key(job))  # A's key expired while it was cut off ...
    assert b.claim()  # ... and B ran the job
    b.release()
    assert r.get(run_key(job)) == "ended:B"
    assert not a.renew() and a.publish("done", ttl=60, completion="{}") == LOST
    assert Fenced(r, job, "C", 5).claim()  # a new delivery may take it (and finds it ended)


def test_the_runs_of_a_worker_known_dead_are_freed_and_no_other(r):
    """Its supervisor saw the worker's process exit: a new delivery of its job starts at
    once. Another worker's run, one whose id merely begins the same, and a job this worker
    ended are left as they are."""
    jobs = [uuid.uuid4().hex for _ in range(4)]
    held = [
        Fenced(r, jobs[0], "w1@host:run1", 5),
        Fenced(r, jobs[1], "w1@host:run2", 5),
        Fenced(r, jobs[2], "w1@host2:run3", 5),
        Fenced(r, jobs[3], "w1@host:run4", 5),
    ]
    assert all(run.claim() for run in held)
    held[3].release()  # ended by the dead worker before it died: kept
    assert free_runs(r, "w1@host", jobs) == 2
    assert [r.get(run_key(job)) for job in jobs] == [
        None, None, "w1@host2:run3", "ended:w1@host:run4"
    ]  # fmt: skip
    assert Fenced(r, jobs[0], "w1@host:new", 5).claim()
    assert free_runs(r, "w1@host", []) == 0
