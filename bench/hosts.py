"""Hosts that fail: recovery times over repeated runs of tests/test_hosts.py.

Runs the test file `--runs` times (each run a fresh pair of network namespaces, workers,
Redis database and PostgreSQL database) and collects the times it prints:

- kill -9 of the busier host's worker -> one of its jobs running again on the other host
  (the other's heartbeat finds the lease expired, FARM_LEASE_TTL 4 s and heartbeat 1 s in
  the tests, and requeues the job; it starts over once the dead run's key expired);
- the busier host's link cut -> one of its jobs requeued and running on the other host;
- the link back after 30 s -> the cut-off worker leasing again and its cut-off runs ended.

Then each figure's median and max, and each run's wall time. Needs what the tests need:
root (for `ip netns`), Redis and PostgreSQL (FARM_TEST_REDIS_URL, FARM_TEST_PG_URL).

    python bench/hosts.py --runs 5
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FIGURES = {
    "kill -9 -> running again": re.compile(r"^kill -9 of .* running again on .*: ([\d.]+) s$"),
    "link cut -> requeued, running": re.compile(r"^link of .* cut .* running on .*: ([\d.]+) s$"),
    "link back -> serving, runs ended": re.compile(r"^link back -> .*: ([\d.]+) s$"),
}


def one_run() -> tuple[dict[str, float], float, str | None]:
    """The figures one run printed, its wall time, and the end of its output if it failed."""
    started = time.monotonic()
    command = [sys.executable, "-m", "pytest", "tests/test_hosts.py", "-s", "-q"]
    r = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    took = time.monotonic() - started
    figures = {}
    for line in r.stdout.splitlines():
        for name, pattern in FIGURES.items():
            if m := pattern.match(line.strip()):
                figures[name] = float(m.group(1))
    return figures, took, None if r.returncode == 0 else (r.stdout + r.stderr)[-4000:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    seen: dict[str, list[float]] = {name: [] for name in FIGURES}
    failed = 0
    for n in range(1, args.runs + 1):
        figures, took, failure = one_run()
        shown = ", ".join(f"{name} {value:.1f} s" for name, value in figures.items())
        print(f"run {n}: {took:.0f} s; {shown}", flush=True)
        if failure is not None:
            failed += 1
            print(f"run {n} FAILED; its output ends:\n{failure}", flush=True)
        for name, value in figures.items():
            seen[name].append(value)
    print(f"\n{args.runs - failed} of {args.runs} runs passed")
    print(f"{'':34} {'runs':>4} {'median':>7} {'max':>6}")
    for name, values in seen.items():
        if values:
            print(
                f"{name:34} {len(values):>4} {statistics.median(values):>6.1f}s "
                f"{max(values):>5.1f}s"
            )
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
