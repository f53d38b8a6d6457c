"""A worker that stops on an error exits non-zero, so that compose's `restart: on-failure`,
systemd or `farm up`'s supervisor start it again (issue: a broker shut down between a job's
end and its ack left the worker logging "Unrecoverable error" and exiting 0)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

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
