"""How long the `farm` command takes to answer: --help, an argument error, and `farm status`
on a small registry (SQLite) and Redis. Median of N runs each, in fresh processes.

    python bench/cli.py [--runs 10]

Needs Redis (FARM_BENCH_REDIS, default redis://127.0.0.1:6379/13).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def timed(env: dict[str, str], *args: str) -> float:
    started = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "farm.cli", *args], env=env, capture_output=True, check=False
    )
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=10)
    args = parser.parse_args()
    home = Path(tempfile.mkdtemp(prefix="farm-bench-cli-"))
    env = {
        **os.environ,
        "FARM_HOME": str(home),
        "FARM_DATABASE_URL": f"sqlite:///{home / 'registry.db'}",
        "FARM_BROKER_URL": os.environ.get("FARM_BENCH_REDIS", "redis://127.0.0.1:6379/13"),
    }
    subprocess.run([sys.executable, "-m", "farm.cli", "db", "upgrade"], env=env, check=True)
    cases = {
        "farm --help": ("--help",),
        "farm submit (missing argument)": ("submit",),
        "farm status": ("status",),
        "farm jobs": ("jobs",),
    }
    print(f"{'command':<32} {'p50':>7} {'min':>7}   ({args.runs} runs each)")
    for name, argv in cases.items():
        times = [timed(env, *argv) for _ in range(args.runs)]
        print(f"{name:<32} {statistics.median(times):6.2f}s {min(times):6.2f}s")


if __name__ == "__main__":
    main()
