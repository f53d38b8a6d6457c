"""Submit rate from one client: `farm.submit` in a loop, `farm.submit_many`, and plain
Celery `send_task` with farm's settings, in one run, on the same broker and registry.

Jobs go to a model that a lease in the registry says is served, but no worker consumes
its queue: this measures queuing alone (validation, registry row, publish). The queue is
emptied afterwards.

    python bench/submit.py [--loop 1000] [--bulk 10000] [--profile]

Needs Redis (FARM_BENCH_REDIS, default redis://127.0.0.1:6379/13, flushed). The
registry is SQLite in a temporary folder unless FARM_BENCH_DATABASE_URL is given.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

MODEL = "bench-model"


def setup() -> None:
    import redis

    broker = os.environ.get("FARM_BENCH_REDIS", "redis://127.0.0.1:6379/13")
    redis.Redis.from_url(broker).flushdb()
    home = Path(tempfile.mkdtemp(prefix="farm-bench-"))
    db = os.environ.get("FARM_BENCH_DATABASE_URL", f"sqlite:///{home / 'registry.db'}")
    os.environ.update({"FARM_HOME": str(home), "FARM_BROKER_URL": broker, "FARM_DATABASE_URL": db})
    from farm.registry import queries, transaction, upgrade
    from farm.registry.tables import LeaseRecord, QuotaRecord

    upgrade(db)
    with transaction(db) as s:
        queries.add_model(s, name=MODEL, path="/nonexistent/bench.gguf", n_ctx=4096)
        queries.register_worker(
            s, worker_id="bench@nowhere", host="nowhere", pid=1, device="cpu", versions={}
        )
        s.add(QuotaRecord(session="bench-quota", tokens_per_day=10**12, max_queued=10**9))
        s.add(
            LeaseRecord(
                worker_id="bench@nowhere",
                model=MODEL,
                device="cpu",
                expires_at=datetime.now(UTC) + timedelta(hours=1),
            )
        )


def rate(n: int, fn) -> float:  # type: ignore[no-untyped-def]
    started = time.perf_counter()
    fn()
    return n / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--loop", type=int, default=1000)
    parser.add_argument("--bulk", type=int, default=10000)
    parser.add_argument("--profile", action="store_true", help="cProfile the submit loop")
    args = parser.parse_args()
    setup()
    import farm
    from farm.context import get_context
    from farm.queue import TASK_NAME, priority_number, queue_name

    ctx = get_context()
    farm.submit("warm up", model=MODEL, max_tokens=1)
    wire = farm.Request(model=MODEL, prompt="x", stopping={"max_tokens": 1}).to_wire()

    rounds = 10  # celery and farm alternate, so that drift in machine speed hits both alike
    per_round = max(1, args.loop // rounds)

    def celery_loop() -> None:
        for _ in range(per_round):
            ctx.app.send_task(
                TASK_NAME,
                args=[wire],
                queue=queue_name(MODEL),
                priority=priority_number("normal"),
                expires=ctx.settings.job_expires,
            )

    def farm_loop() -> None:
        for i in range(per_round):
            farm.submit(f"prompt {i}", model=MODEL, max_tokens=1)

    def farm_quota_loop() -> None:
        for i in range(per_round):
            farm.submit(f"prompt {i}", model=MODEL, max_tokens=1, session="bench-quota")

    def farm_bulk() -> None:
        results = farm.submit_many(
            {"model": MODEL, "prompt": f"prompt {i}", "max_tokens": 1} for i in range(args.bulk)
        )
        assert all(isinstance(r, farm.Job) for r in results), results[:3]

    profiler = cProfile.Profile()
    celery_s = farm_s = quota_s = 0.0
    for _ in range(rounds):
        celery_s += per_round / rate(per_round, celery_loop)
        if args.profile:
            profiler.enable()
        farm_s += per_round / rate(per_round, farm_loop)
        if args.profile:
            profiler.disable()
        quota_s += per_round / rate(per_round, farm_quota_loop)
    n = rounds * per_round
    celery, loop, quota = n / celery_s, n / farm_s, n / quota_s
    bulk = rate(args.bulk, farm_bulk)
    print(f"plain Celery send_task, farm's settings: {celery:8.0f} submits/s ({args.loop})")
    print(
        f"farm.submit in a loop:                  {loop:8.0f} submits/s ({args.loop}), "
        f"{loop / celery:.2f}x Celery"
    )
    print(
        f"farm.submit, session with a quota:      {quota:8.0f} submits/s ({n}), "
        f"{(quota_s - farm_s) / n * 1000:+.2f} ms per submit for the reservation"
    )
    print(
        f"farm.submit_many:                       {bulk:8.0f} submits/s ({args.bulk} in "
        f"{args.bulk / bulk:.2f} s)"
    )
    ctx.redis.flushdb()
    if args.profile:
        stats = pstats.Stats(profiler)
        stats.sort_stats("cumulative").print_stats(25)


if __name__ == "__main__":
    main()
