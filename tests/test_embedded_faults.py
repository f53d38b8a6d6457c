"""`farm up` under faults: its workers killed mid-job, its broker killed with jobs queued,
the terminal's Ctrl-C sent to its whole process group, and a restart with jobs queued.
Nothing is lost; each job has one usage row."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

import farm
from farm.context import get_context, reset_context
from farm.queue import queue_name, stream_key
from farm.registry import queries, transaction
from tests.conftest import finished_usage, free_port, run_cli

pytestmark = pytest.mark.e2e

MODEL = "gemma3-270m"


def bare_env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FARM_")}
    env.update(
        {
            "FARM_HOME": str(home),
            "PYTHONUNBUFFERED": "1",
            "FARM_HEARTBEAT_INTERVAL": "1",
            "FARM_LEASE_TTL": "4",
        }
    )
    return env


def start_up(
    env: dict[str, str], log: Path, *, sigint_ignored: bool = False
) -> subprocess.Popen[bytes]:
    """`farm up` in a session of its own, as a terminal would run it; back once it is up.
    `sigint_ignored`: as a script's `farm up &` starts it, with SIGINT ignored."""
    out = log.open("ab")
    proc = subprocess.Popen(
        [sys.executable, "-m", "farm.cli", "up", "--port", str(free_port())],
        env=env,
        stdout=out,
        stderr=out,
        start_new_session=True,
        preexec_fn=(lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
        if sigint_ignored
        else None,
    )
    deadline = time.monotonic() + 120
    while "farm is up" not in log.read_text(errors="replace").split("farm stopped")[-1]:
        assert proc.poll() is None, log.read_text()
        assert time.monotonic() < deadline, log.read_text()
        time.sleep(0.2)
    return proc


def point_client_at(env: dict[str, str]) -> None:
    for key in ("FARM_HOME",):
        os.environ[key] = env[key]
    for key in ("FARM_BROKER_URL", "FARM_DATABASE_URL"):
        os.environ.pop(key, None)
    reset_context()


def broker_pid() -> int:
    return int(get_context().redis.info("server")["process_id"])


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def worker_pid(db: str) -> int:
    with transaction(db) as s:
        ids = {lease.worker_id for lease in queries.live_leases(s, MODEL)}
        [pid] = [w.pid for w in queries.list_workers(s) if w.id in ids]
    return pid


@pytest.fixture(scope="module")
def up(tmp_path_factory):
    home = tmp_path_factory.mktemp("up-home")
    env = bare_env(home)
    log = home / "up.log"
    proc = start_up(env, log)
    saved = {k: os.environ.get(k) for k in ("FARM_HOME", "FARM_BROKER_URL", "FARM_DATABASE_URL")}
    point_client_at(env)
    yield env, home, log, proc
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(90)
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    reset_context()


def test_a_worker_killed_mid_job_five_times_has_its_job_running_again(up):
    """Each time the supervisor starts the worker again and the job runs again once the new
    worker is up. How soon is the worker's start on the machine (Python, Celery, the model):
    4.6-5.0 s on one CI VM, under 5 s on a faster one; the bound only catches a hang."""
    _, home, log, _ = up
    db = f"sqlite:///{home / 'registry.db'}"
    recoveries = []
    before = len(log.read_text())
    for i in range(5):
        job = farm.submit(f"Tell me a long story ({i}).", model=MODEL, max_tokens=400)
        restarted: list[float] = []
        job.on_restart = restarted.append  # called with the new worker's id
        stream = job.stream(timeout=120)
        next(stream)
        killed_at = time.monotonic()
        os.kill(worker_pid(db), signal.SIGKILL)
        for _ in stream:
            if restarted:  # told the job starts over: it runs again
                break
        recoveries.append(time.monotonic() - killed_at)
        job.cancel()  # it runs again: enough, do not wait for 400 tokens
    print(f"\njob running again after kill -9, 5 times: {[f'{r:.1f}s' for r in recoveries]}")
    assert max(recoveries) < 30
    text = log.read_text()[before:]
    assert text.count("of its jobs queued again") == 5
    # Each had got ready (it ran a job), however soon after the supervisor's last look: a
    # crash, restarted at once, not a crash loop backed off.
    assert text.count("restarting now") == 5, text


def test_the_broker_killed_with_jobs_queued_is_restarted_and_loses_none(up):
    _, home, log, _ = up
    # The worker stops taking jobs first, so that all twelve are in the queue at the kill. A
    # message a worker takes leaves the queue in two writes (kombu's Redis transport: BRPOP,
    # then its `unacked` entry): a kill between them loses it with the worker's memory, and
    # farm/failover.py then ends that job as expired, saying why (seen once in CI).
    app, queue = get_context().app, queue_name(MODEL)
    assert app.control.cancel_consumer(queue, reply=True, timeout=10)
    try:
        broker_killed_with_jobs_queued(home, log, resume=lambda: consume_again(app, queue))
    finally:
        consume_again(app, queue)


def consume_again(app: object, queue: str) -> None:
    """The worker takes the model's jobs again (once the broker answers)."""
    deadline = time.monotonic() + 60
    while True:
        try:
            if app.control.add_consumer(queue, reply=True, timeout=5):  # type: ignore[attr-defined]
                return
        except Exception:  # the broker is still starting
            pass
        assert time.monotonic() < deadline, "the worker did not take the queue again"
        time.sleep(0.5)


def broker_killed_with_jobs_queued(home: Path, log: Path, resume: Callable[[], None]) -> None:
    jobs = [farm.submit(f"Count to {i}:", model=MODEL, max_tokens=24) for i in range(12)]
    # The submits must be in the broker's append-only file before the kill: with
    # appendfsync everysec, Redis may hold writes back for up to 2 s while an fsync is under
    # way. WAITAOF returns once this connection's write is on disk, and the file is written
    # in order, so the submits before it are too.
    pipe = get_context().broker_redis.pipeline(transaction=False)
    pipe.set("farm:test:aof", "1")
    pipe.execute_command("WAITAOF", 1, 0, 10_000)
    assert pipe.execute()[1] == [1, 0]
    os.kill(broker_pid(), signal.SIGKILL)
    resume()
    for job in jobs:
        c = job.result(timeout=180)
        assert c.usage.completion_tokens > 0
    assert "broker   exited with status -9; restarting it on the same port" in log.read_text()
    db = f"sqlite:///{home / 'registry.db'}"
    for job in jobs:
        [row] = finished_usage(db, job.id, timeout=30)
        assert row.status == "succeeded"  # type: ignore[attr-defined]


def test_a_broker_restart_while_a_job_runs_does_not_start_it_a_second_time(up):
    """The reproduction of the one-run-at-a-time issue: stream a job, stop its worker, kill
    the broker, let farm up restart it, let the worker go on. kombu hands the job's message
    out again while its first run goes on; before, the worker ran it a second time at once
    (two done events, the runs' tokens mixed on the stream)."""
    _, home, log, _ = up
    db = f"sqlite:///{home / 'registry.db'}"
    for i in range(3):
        restarts = log.read_text().count("restarting it on the same port")
        job = farm.submit(f"Describe a river delta ({i}).", model=MODEL, max_tokens=80, seed=i)
        stream = job.stream(timeout=180)
        text = "".join(next(stream) for _ in range(5))
        worker, broker = worker_pid(db), broker_pid()
        os.kill(worker, signal.SIGSTOP)
        try:
            # What the worker wrote before it stopped must be in the broker's append-only file
            # before the kill: Redis appends each write at once, except while its last fsync
            # is still under way (appendfsync everysec), when it holds writes back for up to
            # 2 s (aof.c, flushAppendOnlyFile). A kill inside that window loses them: CI once
            # lost two of a stream's tokens so, with the kill 1.1 s after the last write.
            time.sleep(2.5)
            os.kill(broker, signal.SIGKILL)
            deadline = time.monotonic() + 30
            while log.read_text().count("restarting it on the same port") == restarts:
                assert time.monotonic() < deadline, log.read_text()[-3000:]
                time.sleep(0.1)
        finally:
            os.kill(worker, signal.SIGCONT)
        text += "".join(stream)
        c = job.completion
        assert c is not None
        events = [f for _, f in get_context().redis.xrange(stream_key(job.id))]
        kinds = [f["kind"] for f in events]
        assert kinds.count("done") == 1, kinds
        # The run that ended wrote its text alone: after the last restart marker (if the job
        # had to start over), the stream holds exactly the Completion's text.
        last = max((n for n, k in enumerate(kinds) if k == "restart"), default=-1)
        after = "".join(f["text"] for f in events[last + 1 :] if f["kind"] == "token")
        assert after == c.text
        [row] = finished_usage(db, job.id, timeout=30)
        assert (row.status, row.completion_tokens) == (  # type: ignore[attr-defined]
            "succeeded",
            c.usage.completion_tokens,
        )


def test_ctrl_c_to_the_process_group_finishes_the_running_job_and_a_restart_runs_the_queue(up):
    env, home, log, proc = up
    running = farm.submit("Tell me a story.", model=MODEL, max_tokens=60)
    next(running.stream(timeout=120))
    queued = [farm.submit(f"Later {i}", model=MODEL, max_tokens=4) for i in range(8)]
    children = [broker_pid(), worker_pid(f"sqlite:///{home / 'registry.db'}")]
    os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does
    assert proc.wait(120) == 0
    assert not any(alive(pid) for pid in children), "processes of the stopped farm still run"
    db = f"sqlite:///{home / 'registry.db'}"
    [row] = finished_usage(db, running.id, timeout=5)
    assert row.status == "succeeded"  # type: ignore[attr-defined]  # not cut by the Ctrl-C

    again = start_up(env, log, sigint_ignored=True)  # a script's `farm up &` this time
    try:
        point_client_at(env)
        c = farm.Job(running.id).result(timeout=10)  # results remain readable after a restart
        assert c.usage.completion_tokens == 60 or c.finish_reason == "stop"
        for job in queued:
            assert farm.Job(job.id).result(timeout=180).usage.completion_tokens > 0
        # From another shell, not waiting for the running job: its two signals may land
        # while the gateway and feeder stop; the workers and broker stop all the same.
        long = farm.submit("Tell me a long story.", model=MODEL, max_tokens=400)
        next(long.stream(timeout=120))
        children = [broker_pid(), worker_pid(db)]
        down = run_cli(env, "down", "--now", timeout=120)
        assert down.returncode == 0 and "farm stopped" in down.stderr, down.stderr
        assert again.wait(30) == 0
        assert not any(alive(pid) for pid in children), "processes of the stopped farm still run"
        assert f"its job {long.id} is queued again" in log.read_text()  # not lost
        with transaction(db) as s:  # and said so: not running on a worker that is gone
            row = queries.get_usage(s, long.id)
            assert row is not None and (row.status, row.worker_id) == ("queued", None)
        assert run_cli(env, "down").returncode == 1  # nothing left to stop
    finally:
        if again.poll() is None:
            os.killpg(again.pid, signal.SIGINT)
            again.wait(90)


def test_a_batch_resumes_after_the_whole_farm_is_stopped_and_started(tmp_path):
    """Ctrl-C mid-batch, `farm up` again: the batch completes, and every line has exactly
    one result and one usage row (nothing lost, nothing run twice)."""
    env = bare_env(tmp_path / "home")
    log = tmp_path / "up.log"
    path = tmp_path / "batch.jsonl"
    path.write_text(
        "".join(
            json.dumps(
                {
                    "custom_id": f"line-{i}",
                    "method": "POST",
                    "url": "/v1/completions",
                    "body": {"model": MODEL, "prompt": f"Fact {i}:", "max_tokens": 24},
                }
            )
            + "\n"
            for i in range(60)
        )
    )
    proc = start_up(env, log)
    try:
        submitted = run_cli(env, "batch", "submit", str(path), "--name", "resume")
        assert submitted.returncode == 0, submitted.stderr
        batch_id = submitted.stdout.strip()
        deadline = time.monotonic() + 120
        while True:
            status = json.loads(run_cli(env, "batch", "status", batch_id, "--json").stdout)
            if status["request_counts"]["completed"] >= 5:
                break
            assert time.monotonic() < deadline, status
            time.sleep(0.3)
        os.killpg(proc.pid, signal.SIGINT)  # the terminal's Ctrl-C, mid-batch
        assert proc.wait(120) == 0
        stopped = json.loads(run_cli(env, "batch", "status", batch_id, "--json").stdout)
        assert stopped["status"] == "in_progress" and stopped["request_counts"]["completed"] < 60

        proc = start_up(env, log)
        waited = run_cli(env, "batch", "wait", batch_id, "--timeout", "240", timeout=300)
        assert waited.returncode == 0, waited.stdout + waited.stderr
        results = run_cli(env, "batch", "results", batch_id).stdout.splitlines()
        ids = [json.loads(x)["custom_id"] for x in results]
        assert sorted(ids) == sorted(f"line-{i}" for i in range(60))  # each exactly once
        db = f"sqlite:///{tmp_path / 'home' / 'registry.db'}"
        with transaction(db) as s:
            rows = queries.recent_jobs(s, limit=None)
        assert len(rows) == 60 and {r.status for r in rows} == {"succeeded"}
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGINT)
            proc.wait(90)
