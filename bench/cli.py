"""How long the `farm` command takes to answer: --help, an argument error, `farm status`
and `farm jobs`. Median of N runs each, in fresh processes.

    python bench/cli.py [--runs 10]

`farm status` beside a running `farm up` (in a temporary home, with its own broker and
one worker), where the command asks that process (farm/local.py); on servers named by
FARM_BROKER_URL / FARM_DATABASE_URL with no `farm up` here, where it reads the registry and
broker itself (needs Redis: FARM_BENCH_REDIS, default redis://127.0.0.1:6379/13); and
beside `farm up` again while its worker generates in every slot, with `farm status JOB` of
a running job.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def timed(env: dict[str, str], *args: str) -> float:
    started = time.perf_counter()
    r = subprocess.run(
        [sys.executable, "-m", "farm.cli", *args], env=env, capture_output=True, check=False
    )
    took = time.perf_counter() - started
    if args[0] in ("status", "jobs") and r.returncode != 0:
        sys.exit(f"farm {' '.join(args)} failed: {r.stderr.decode()}")
    return took


def report(name: str, times: list[float]) -> None:
    print(f"{name:<36} {statistics.median(times):6.2f}s {min(times):6.2f}s")


def cli(env: dict[str, str], *args: str) -> str:
    return subprocess.run(
        [sys.executable, "-m", "farm.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()


def farm_up(env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:  # a file, not a pipe: nobody needs to keep reading it
        proc = subprocess.Popen(
            [sys.executable, "-m", "farm.cli", "up", "--port", "0"], env=env, stderr=out
        )
    while "farm is up" not in log.read_text():
        if proc.poll() is not None:
            sys.exit(f"farm up exited with {proc.returncode}:\n{log.read_text()}")
        time.sleep(0.1)
    return proc


def asks_the_farm(env: dict[str, str]) -> bool:
    """Whether `farm status` here got its answer from the running farm (no SQLAlchemy)."""
    r = subprocess.run(
        [sys.executable, "-m", "farm.cli", "status"],
        env={**env, "PYTHONPROFILEIMPORTTIME": "1"},
        capture_output=True,
        text=True,
        check=True,
    )
    return "sqlalchemy" not in r.stderr


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=10)
    args = parser.parse_args()
    bare = {k: v for k, v in os.environ.items() if not k.upper().startswith("FARM_")}
    home = Path(tempfile.mkdtemp(prefix="farm-bench-cli-"))
    servers = {
        **bare,
        "FARM_HOME": str(home / "servers"),
        "FARM_DATABASE_URL": f"sqlite:///{home / 'registry.db'}",
        "FARM_BROKER_URL": os.environ.get("FARM_BENCH_REDIS", "redis://127.0.0.1:6379/13"),
    }
    subprocess.run([sys.executable, "-m", "farm.cli", "db", "upgrade"], env=servers, check=True)
    local = {**bare, "FARM_HOME": str(home / "up")}
    cases = {
        "farm --help": (servers, ("--help",)),
        "farm submit (missing argument)": (servers, ("submit",)),
        "farm status (beside farm up)": (local, ("status",)),
        "farm status (servers, no farm up)": (servers, ("status",)),
        "farm jobs": (servers, ("jobs",)),
    }
    up = farm_up(local, home / "up.log")
    try:
        print(f"farm status beside farm up asks it: {asks_the_farm(local)}")
        print(f"{'command':<36} {'p50':>7} {'min':>7}   ({args.runs} runs each)")
        for name, (env, argv) in cases.items():
            report(name, [timed(env, *argv) for _ in range(args.runs)])
        # The same beside a worker generating in every slot, both cores busy.
        submit = ["submit", "Count to a thousand.", "--max-tokens", "3000", "--no-wait"]
        jobs = [cli(local, *submit) for _ in range(4)]
        time.sleep(3)
        times = [timed(local, "status") for _ in range(args.runs)]
        report("farm status (beside farm up, busy)", times)
        times = [timed(local, "status", jobs[0]) for _ in range(args.runs)]
        report("farm status JOB (same, running)", times)
        fleet = json.loads(cli(local, "status", "--json"))
        print(
            "  slots busy then:",
            ", ".join(f"{w['slots_busy']}/{w['slots']}" for w in fleet["workers"]),
        )
        for job in jobs:
            cli(local, "cancel", job)
    finally:
        up.send_signal(signal.SIGINT)
        up.wait(60)


if __name__ == "__main__":
    main()
