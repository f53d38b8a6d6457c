"""The floor under farm's added latency: a no-op Celery task's round trip on this machine,
with farm's own Celery settings (JSON, priorities, acks_late, prefetch 1, the threads pool with 4 slots as a CPU worker has, worker
events) and the same embedded broker `farm up` uses.

    python bench/celery_floor.py [--runs 200]

Whatever farm adds per job beyond this (registry writes, the token stream) is farm's own.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=200)
    args = parser.parse_args()

    from farm_under_bench import farm_for_bench

    with farm_for_bench([]):
        times = _round_trips(args.runs)
    times.sort()
    print(
        f"no-op Celery round trip over {args.runs} runs: p50 {statistics.median(times):.2f} ms, "
        f"p90 {times[int(0.9 * (len(times) - 1))]:.2f} ms, p99 {times[int(0.99 * (len(times) - 1))]:.2f} ms"
    )
    return 0


def _round_trips(runs: int) -> list[float]:
    env = {**os.environ, "PYTHONPATH": str(HERE)}
    worker = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "noop_app", "worker", "--pool=threads", "--concurrency=4",
         "--queues=bench", "--without-mingle", "--without-gossip", "--task-events",
         "--loglevel=WARNING"],
        env=env, cwd=HERE,
    )  # fmt: skip
    try:
        sys.path.insert(0, str(HERE))
        from noop_app import app

        def once() -> float:
            t = time.perf_counter()
            app.send_task("bench.noop", args=[1], queue="bench", priority=0).get(timeout=30)
            return (time.perf_counter() - t) * 1000

        deadline = time.monotonic() + 60
        while True:  # the first call waits for the worker to come up
            try:
                once()
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
        return [once() for _ in range(runs)]
    finally:
        worker.terminate()
        worker.wait(30)


if __name__ == "__main__":
    sys.exit(main())
