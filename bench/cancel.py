"""Cancel to stop: how much of a job gets through after `Job.cancel()` returns, under load.

Streams N jobs on a real farm (embedded unless FARM_BROKER_URL is set) running Gemma 3
270M, with `--load` more jobs keeping the worker's other slots busy. Each streaming job is
cancelled after a few tokens (a different number each time). For each it reports the
tokens that reached the stream after cancel() returned (goal: 0), the time from cancel()
returning to the job's final event, and how its billed completion tokens compare with
what was streamed.

    python bench/cancel.py --cancels 100 --load 3
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from farm_under_bench import farm_for_bench

MODEL = "gemma3-270m"
PROMPT = "Write a long story about a lighthouse keeper and the sea, in many chapters."


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cancels", type=int, default=100)
    parser.add_argument("--load", type=int, default=3, help="jobs kept running beside")
    args = parser.parse_args()
    with farm_for_bench([MODEL]):
        run(args.cancels, args.load)


def run(cancels: int, load: int) -> None:
    import farm
    from farm.context import get_context
    from farm.errors import JobCancelled
    from farm.queue import stream_key
    from farm.registry import queries, transaction

    ctx = get_context()
    stop = threading.Event()

    def keep_busy() -> None:
        while not stop.is_set():
            farm.infer(PROMPT, model=MODEL, max_tokens=48, timeout=600)

    loaders = [threading.Thread(target=keep_busy, daemon=True) for _ in range(load)]
    for t in loaders:
        t.start()
    after_cancel: list[int] = []
    to_end_ms: list[float] = []
    over_billed: list[int] = []
    for i in range(cancels):
        job = farm.submit(PROMPT, model=MODEL, max_tokens=400, seed=i)
        tokens = job.stream(timeout=600)
        for _ in range(1 + i % 7):
            next(tokens)
        job.cancel()
        returned = time.monotonic()
        [(mark, _)] = ctx.redis.xrevrange(stream_key(job.id), count=1)
        try:
            for _ in tokens:
                pass
        except JobCancelled:
            pass
        to_end_ms.append((time.monotonic() - returned) * 1000)
        events = ctx.redis.xrange(stream_key(job.id))
        after_cancel.append(
            sum(1 for entry, f in events if entry > mark and f.get("kind") == "token")
        )
        streamed = sum(1 for _, f in events if f.get("kind") == "token")
        deadline = time.monotonic() + 30
        while True:
            with transaction(ctx.database_url) as s:
                row = queries.get_usage(s, job.id)
            if (row is not None and row.status != "running") or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        over_billed.append((row.completion_tokens or 0) - streamed if row else -1)
    stop.set()
    print(f"cancels: {cancels}, jobs running beside: {load}")
    print(
        f"tokens streamed after cancel() returned: total {sum(after_cancel)}, "
        f"max {max(after_cancel)} (goal 0)"
    )
    print(
        f"cancel() returned -> final event: p50 {statistics.median(to_end_ms):.1f} ms, "
        f"max {max(to_end_ms):.1f} ms"
    )
    print(
        f"billed minus streamed tokens: p50 {statistics.median(over_billed)}, "
        f"max {max(over_billed)}, min {min(over_billed)}"
    )


if __name__ == "__main__":
    main()
