"""Faults a farm meets in use: a registry outage under load, a start race on PostgreSQL,
a worker cut off mid-transaction, garbage on a model's queue, Celery's own tasks sent to a
model's queue, a password in a URL. Nothing is lost and no usage row is wrong."""

from __future__ import annotations

import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlsplit

import pytest
import redis
from celery.exceptions import NotRegistered
from sqlalchemy import select, text, update
from sqlalchemy.engine import make_url

import farm
from farm.context import get_context, reset_context
from farm.queue import TASK_NAME, priority_list_key, queue_name, stream_key
from farm.registry import db as db_module
from farm.registry import transaction
from farm.registry.db import get_engine
from farm.registry.tables import UsageRecord
from tests import netns
from tests.conftest import (
    MODEL,
    REDIS_URL,
    FarmUnderTest,
    drop_pg_database,
    finished_usage,
    holds_lease,
    make_pg_database,
    prepare_registry,
    run_cli,
)
from tests.proxy import Proxy

pytestmark = pytest.mark.e2e

# Its own Redis database, so the shared live farm's worker never takes these jobs.
FAULT_REDIS = REDIS_URL.rsplit("/", 1)[0] + "/11"


@pytest.fixture(scope="module")
def pg_farm(redis_url, pg_server, tmp_path_factory):
    """A worker (8 slots) whose registry is PostgreSQL reached through a proxy the test
    can cut. The test itself reads the registry directly."""
    client = redis.Redis.from_url(FAULT_REDIS)
    client.flushdb()
    direct = make_pg_database(pg_server)
    proxy, proxied = through_proxy(direct)
    prepare_registry(direct)
    f = FarmUnderTest(tmp_path_factory.mktemp("pg-farm"), FAULT_REDIS, proxied)
    proc = f.start_worker(MODEL, "pg@test", "--parallel", "8")
    f.wait_for_lease(proc=proc)
    # The worker reaches the registry through the proxy; this process, the client and
    # the test's own reads, directly: the outage is the worker's.
    f.env["FARM_DATABASE_URL"] = direct
    f.database_url = direct
    f.activate()
    yield f, direct, proxy
    f.stop_workers()
    proxy.cut()
    client.flushdb()
    drop_pg_database(pg_server, direct)


def through_proxy(database_url: str) -> tuple[Proxy, str]:
    """A proxy before the database, and the database's URL through it."""
    url = make_url(database_url)
    proxy = Proxy(url.host or "127.0.0.1", url.port or 5432)
    return proxy, url.set(port=proxy.port).render_as_string(hide_password=False)


def rows(db: str, ids: list[str]) -> dict[str, UsageRecord]:
    with transaction(db) as s:
        return {
            r.job_id: r for r in s.scalars(select(UsageRecord).where(UsageRecord.job_id.in_(ids)))
        }


def test_hundreds_of_submits_on_postgresql_leave_no_row_behind(pg_farm):
    f, db, _ = pg_farm
    f.activate()
    with ThreadPoolExecutor(4) as pool:
        jobs = list(pool.map(lambda i: farm.submit(f"n{i}", model=MODEL, max_tokens=1), range(300)))
    for job in jobs:
        job.result(timeout=180)
    deadline = time.monotonic() + 30
    while True:
        found = rows(db, [j.id for j in jobs])
        if all(r.status == "succeeded" for r in found.values()) and len(found) == len(jobs):
            break
        assert time.monotonic() < deadline, {r.status for r in found.values()}
        time.sleep(0.2)
    assert all(r.worker_id == "pg@test" and r.completion_tokens == 1 for r in found.values())


def test_a_ten_second_registry_outage_under_load_fails_no_job_and_leaves_every_row_right(pg_farm):
    f, db, proxy = pg_farm
    f.activate()
    jobs = [farm.submit(f"Story {i}:", model=MODEL, max_tokens=40) for i in range(24)]
    next(jobs[0].stream(timeout=60))  # the worker is at it
    proxy.cut()
    cut_at = time.monotonic()
    try:
        time.sleep(10)
    finally:
        proxy.restore()
    print(f"\nregistry cut for {time.monotonic() - cut_at:.1f}s with {len(jobs)} jobs in play")
    try:
        completions = {j.id: j.result(timeout=120) for j in jobs}  # none failed
    except farm.JobTimeout:
        # Say what the worker is doing: every thread's stack, into its log.
        worker = f.workers[0]
        os.kill(worker.pid, signal.SIGUSR1)
        time.sleep(2)
        log = next(f.home.glob("worker-*.log")).read_text(errors="replace")
        pytest.fail("a job never finished; the worker's log ends:\n" + log[-12000:])
    for job in jobs:
        [row] = finished_usage(db, job.id, timeout=60)
        c = completions[job.id]
        assert (row.status, row.worker_id) == ("succeeded", "pg@test")  # type: ignore[attr-defined]
        assert row.completion_tokens == c.usage.completion_tokens  # type: ignore[attr-defined]
        assert row.prompt_tokens == c.usage.prompt_tokens  # type: ignore[attr-defined]


def test_a_worker_cut_off_mid_transaction_does_not_lock_a_jobs_row_for_good(pg_server, monkeypatch):
    """A worker's network goes between two statements of a transaction (the CI run that
    found this: one job of 24 never finished after a registry outage). Its server session
    sits idle in that transaction, holding the job's row, and nothing tells the server that
    the client has gone. The server must end that session, so the job's next delivery can
    write its row."""
    direct = make_pg_database(pg_server)
    proxy, proxied = through_proxy(direct)
    try:
        prepare_registry(direct)
        monkeypatch.setattr(db_module, "IDLE_IN_TRANSACTION_MS", 3000)  # 30 s in use
        with transaction(direct) as s:
            s.add(
                UsageRecord(
                    job_id="j1", session="s", model=MODEL, priority="normal", status="queued"
                )
            )
        worker_side = get_engine(proxied).connect()
        worker_side.begin()
        worker_side.execute(
            update(UsageRecord).where(UsageRecord.job_id == "j1").values(status="running")
        )
        proxy.partition()
        cut_at = time.monotonic()
        with transaction(direct) as s:
            s.execute(text("SET LOCAL lock_timeout = '20s'"))  # without the fix: fails here
            s.execute(
                update(UsageRecord).where(UsageRecord.job_id == "j1").values(status="succeeded")
            )
        waited = time.monotonic() - cut_at
        assert 2 < waited < 15, waited
        [row] = rows(direct, ["j1"]).values()
        assert row.status == "succeeded"
    finally:
        proxy.cut()
        get_engine(proxied).dispose()
        drop_pg_database(pg_server, direct)


def test_a_registry_session_ends_a_lost_transaction_and_probes_its_client_unless_the_operator_chose_otherwise(
    pg_server,
):
    """The server ends a session left in a transaction after 30 s, and probes an idle
    session's client from 60 s of silence (a vanished host's pool is closed in ~2 min, not
    2 h); a value the operator set in the URL, 0 included, is kept."""
    direct = make_pg_database(pg_server)
    option = (
        "?options=-c%20idle_in_transaction_session_timeout%3D{}%20-c%20tcp_keepalives_idle%3D{}"
    )
    chosen = {
        direct: ("30s", "60"),
        direct + option.format(7000, 300): ("7s", "300"),
        direct + option.format(0, 120): ("0", "120"),
    }
    try:
        for url, expected in chosen.items():
            with get_engine(url).connect() as conn:
                shown = (
                    conn.scalar(text("SHOW idle_in_transaction_session_timeout")),
                    conn.scalar(text("SHOW tcp_keepalives_idle")),
                )
                assert shown == expected, url
                if url == direct:
                    assert conn.scalar(text("SHOW tcp_keepalives_interval")) == "10"
                    assert conn.scalar(text("SHOW tcp_keepalives_count")) == "6"
    finally:
        for url in chosen:
            get_engine(url).dispose()
        drop_pg_database(pg_server, direct)


def test_garbage_on_a_model_queue_is_dropped_and_the_worker_goes_on(farm_client):
    r = get_context().redis
    for junk in (b"not json at all", b"12345", b'{"no": "envelope"}', b"\xff\xfe"):
        r.lpush(priority_list_key(MODEL, 5), junk)
    deadline = time.monotonic() + 30
    while r.llen(priority_list_key(MODEL, 5)):
        assert time.monotonic() < deadline, "the worker stopped taking from its queue"
        time.sleep(0.1)
    assert all(p.poll() is None for p in farm_client.workers)
    c = farm.infer("Hello", model=MODEL, max_tokens=2, timeout=60)
    assert c.usage.completion_tokens > 0


def test_celerys_own_tasks_do_not_run_on_a_model_queue(farm_client):
    result = get_context().app.send_task("celery.backend_cleanup", queue=queue_name(MODEL))
    with pytest.raises(NotRegistered):
        result.get(timeout=30)
    log = next(farm_client.home.glob("worker-*.log")).read_text(errors="replace")
    assert "discarded a message for a task this worker does not run" in log
    assert "The full contents of the message body" not in log


def test_a_malformed_job_fails_with_a_usage_row_and_one_log_line(farm_client):
    bad = get_context().app.send_task(
        TASK_NAME,
        args=[{"model": MODEL, "prompt": "x", "temperature": 99}],
        queue=queue_name(MODEL),
    )
    with pytest.raises(farm.JobFailed, match="invalid request"):
        farm.Job(bad.id).result(timeout=60)
    [row] = finished_usage(farm_client.database_url, bad.id)
    assert (row.status, row.model) == ("failed", MODEL)  # type: ignore[attr-defined]
    assert "sampling.temperature" in (row.error or "")  # type: ignore[attr-defined]
    log = next(farm_client.home.glob("worker-*.log")).read_text(errors="replace").splitlines()
    mine = [i for i, line in enumerate(log) if bad.id in line]
    assert any("failed: invalid request" in log[i] for i in mine)
    assert all(not log[i + 1].startswith("Traceback") for i in mine if i + 1 < len(log))


def test_the_broker_password_never_appears_in_an_error(farm_client, monkeypatch):
    monkeypatch.setenv("FARM_BROKER_URL", "redis://:SuperSecret123@127.0.0.1:1/0")
    reset_context()
    try:
        with pytest.raises(farm.FarmUnavailable) as caught:
            farm.submit("hi", model=MODEL, max_tokens=2)
    finally:
        monkeypatch.undo()
        farm_client.activate()
    assert "SuperSecret123" not in str(caught.value)
    assert "redis://:***@127.0.0.1:1/0" in str(caught.value)


def test_a_job_recorded_as_failed_is_never_run_again_when_delivered_again(farm_client):
    job = farm.submit("word " * 6000, model=MODEL, max_tokens=4)  # longer than the context
    with pytest.raises(farm.JobFailed, match="holds 4096"):
        job.result(timeout=60)
    [before] = finished_usage(farm_client.database_url, job.id)
    request = farm.Request.model_validate({"model": MODEL, "prompt": "short now", "max_tokens": 4})
    get_context().redis.delete(stream_key(job.id))  # only the registry remembers
    get_context().app.send_task(
        TASK_NAME, args=[request.to_wire()], task_id=job.id, queue=queue_name(MODEL)
    )
    with pytest.raises(farm.JobFailed, match="holds 4096"):
        farm.Job(job.id).result(timeout=60)
    [after] = finished_usage(farm_client.database_url, job.id)
    assert (after.status, after.completion_tokens) == ("failed", 0)  # type: ignore[attr-defined]
    assert after.finished_at == before.finished_at  # type: ignore[attr-defined]


def test_db_upgrade_on_an_unreachable_database_says_so_without_a_traceback(tmp_path):
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("FARM_")},
        "FARM_HOME": str(tmp_path),
        "FARM_DATABASE_URL": "postgresql://farm:Secret42@127.0.0.1:1/farm",
    }
    r = run_cli(env, "db", "upgrade", timeout=60)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "cannot reach the registry at postgresql://farm:***@127.0.0.1:1/farm" in r.stderr
    assert "Secret42" not in r.stderr


def test_a_partitioned_workers_job_runs_on_another_and_the_cut_off_run_writes_nothing_more(
    redis_url, pg_server, tmp_path
):
    """The partition of issue 22: a worker cut off from Redis and PostgreSQL mid-job loses
    its lease; another worker runs the job again; when the link comes back, the cut-off
    run must neither stream into the job nor end it (before: both runs' text interleaved
    on the stream).

    The cut-off worker runs in a network namespace of its own (another host, as far as the
    network goes) and its link is taken down: packets dropped, nothing reset. Where no
    namespace can be made (not root), the proxies it talks through stop passing data."""
    fault_redis = REDIS_URL.rsplit("/", 1)[0] + "/12"
    redis.Redis.from_url(fault_redis).flushdb()
    direct = make_pg_database(pg_server)
    prepare_registry(direct)
    host = netns.make()
    if isinstance(host, str):
        print(f"\npartition by proxies: {host}")
    listen = "127.0.0.1" if isinstance(host, str) else host.address
    db_url, url = make_url(direct), urlsplit(fault_redis)
    pg_proxy = Proxy(db_url.host or "127.0.0.1", db_url.port or 5432, listen=listen)
    pg_proxied = db_url.set(host=listen, port=pg_proxy.port).render_as_string(hide_password=False)
    redis_proxy = Proxy(url.hostname or "127.0.0.1", url.port or 6379, listen=listen)
    redis_proxied = url._replace(netloc=f"{listen}:{redis_proxy.port}").geturl()
    cut_off = FarmUnderTest(tmp_path / "a", redis_proxied, pg_proxied)
    if not isinstance(host, str):
        cut_off.prefix = host.prefix
    healthy = FarmUnderTest(tmp_path / "b", fault_redis, direct)
    for f in (cut_off, healthy):
        f.home.mkdir()
    try:
        cut_off.wait_for_lease(proc=cut_off.start_worker(MODEL, "a@part", "--parallel", "2"))
        healthy.activate()  # the test and its client reach both servers directly
        # Long enough to outlast b@part's start (5 s or more on a loaded 2-core VM).
        job = farm.submit("Write a long story about a river.", model=MODEL, max_tokens=600, seed=7)
        stream = job.stream(timeout=300)
        for _ in range(5):
            next(stream)  # it runs on a@part, the only worker
        second = healthy.start_worker(MODEL, "b@part", "--parallel", "2")
        holds_lease("b@part", direct, second)  # up before the cut: the time is the cut's
        if isinstance(host, str):
            pg_proxy.partition()
            redis_proxy.partition()
        else:
            host.cut()
        cut_at = time.monotonic()
        r = get_context().redis
        deadline = time.monotonic() + 120
        while not any(  # b@part reaped a@part and started the job over
            f.get("kind") == "restart" and f.get("worker") == "b@part"
            for _, f in r.xrange(stream_key(job.id))
        ):
            assert second.poll() is None and time.monotonic() < deadline
            time.sleep(0.2)
        print(f"\nlink cut -> the job running on b@part: {time.monotonic() - cut_at:.1f} s")
        if isinstance(host, str):  # the link comes back
            for proxy in (pg_proxy, redis_proxy):
                proxy.cut()
                proxy.restore()
        else:
            host.restore()
        for _ in stream:
            pass
        c = job.completion
        assert c is not None and c.worker == "b@part"
        events = [f for _, f in r.xrange(stream_key(job.id))]
        kinds = [f["kind"] for f in events]
        assert kinds.count("done") == 1
        last = max(n for n, k in enumerate(kinds) if k == "restart")
        after = "".join(f["text"] for f in events[last + 1 :] if f["kind"] == "token")
        assert after == c.text  # b@part's text alone, nothing of a@part's run in it
        [row] = finished_usage(direct, job.id, timeout=30)
        assert (row.status, row.worker_id, row.completion_tokens) == (  # type: ignore[attr-defined]
            "succeeded",
            "b@part",
            c.usage.completion_tokens,
        )
        holds_lease("a@part", direct)  # back on the network, a@part serves again
    finally:
        for f in (cut_off, healthy):
            f.stop_workers()
        pg_proxy.cut()
        redis_proxy.cut()
        if not isinstance(host, str):
            host.close()
        redis.Redis.from_url(fault_redis).flushdb()
        drop_pg_database(pg_server, direct)


def test_a_reader_cut_off_from_redis_as_it_asks_the_backend_rides_it_out(
    migrated_db, redis_url, tmp_path
):
    """A job whose stream expired: its reader asks the result backend, and a cut then
    raised redis's ConnectionError out of Job.result() (a traceback) instead of waiting
    for Redis to come back, as a cut during its XREAD does."""
    import threading
    import uuid
    from datetime import UTC, datetime

    from farm.completion import Completion
    from farm.config import Settings
    from farm.context import FarmContext
    from farm.registry import queries
    from farm.results import Job

    server = urlsplit(redis_url)
    proxy = Proxy(server.hostname or "127.0.0.1", server.port or 6379)
    url = f"redis://127.0.0.1:{proxy.port}{server.path}"
    ctx = FarmContext(Settings(home=tmp_path, broker_url=url, database_url=migrated_db))
    job_id = str(uuid.uuid4())
    done = Completion(
        job_id=job_id, model="m", text="kept", finish_reason="stop", worker="w",
        usage={"prompt_tokens": 1, "completion_tokens": 1},
        timings={"queue_wait_ms": 1, "ttft_ms": 1, "generation_ms": 1},
    )  # fmt: skip
    with transaction(migrated_db) as s:
        queries.record_queued(
            s, job_id=job_id, session="s", model="m", priority="normal",
            submitted_at=datetime.now(UTC),
        )  # fmt: skip
        s.execute(
            update(UsageRecord).where(UsageRecord.job_id == job_id).values(status="succeeded")
        )
    ctx.app.backend.store_result(job_id, done.model_dump(mode="json"), "SUCCESS")

    class CutAsItSettles(Job):
        cuts = 0

        def settled(self) -> bool:
            if not self.cuts:
                self.cuts += 1
                proxy.cut()
                threading.Timer(1.0, proxy.restore).start()
            return super().settled()

    try:
        reader = CutAsItSettles(job_id, "m", ctx)
        assert reader.result(timeout=30).text == "kept"
        assert reader.cuts == 1
    finally:
        ctx.app.close()
        proxy.cut()
