"""Batch jobs and the gateway: what a 10,000-line batch costs, and what HTTP adds.

In one run, on a whole embedded farm (valkey broker, SQLite registry, one worker) started
in a temporary folder, or the farm named by FARM_BROKER_URL / FARM_DATABASE_URL:

1. direct: llama-cpp-python's create_completion in a loop, 1-token completions (the floor
   of one sequence at a time, no farm);
2. loop: `farm.submit` of N 1-token completions in a loop, then every result;
3. batch: a file of --lines 1-token completions: the time to check and accept it
   (`farm.batches.submit`), then lines/s through the worker with the feeder in this
   process, and Redis's used memory sampled every half second while it runs (flat: the
   feeder keeps FARM_BATCH_WINDOW lines queued, whatever the batch's size);
4. gateway: POST /v1/completions to a `farm serve` process against `farm.infer`, paired
   and alternating, 1-token completions; the median added ms.

    python bench/batch.py [--lines 10000] [--loop 1000] [--runs 40]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path


def direct_rate(path: str, n: int) -> float:
    import llama_cpp

    from workers.repack import default_repack, model_params

    threads = len(os.sched_getaffinity(0))
    with model_params(repack=default_repack()):  # workers/repack.py
        llm = llama_cpp.Llama(
            model_path=path, n_ctx=4096, n_threads=threads, n_threads_batch=threads, verbose=False
        )
    llm.create_completion("Item -1:", max_tokens=1)
    started = time.perf_counter()
    for i in range(n):
        llm.create_completion(f"Item {i}:", max_tokens=1, temperature=0.0)
    rate = n / (time.perf_counter() - started)
    llm.close()
    return rate


def loop_rate(model: str, n: int) -> float:
    import farm

    started = time.perf_counter()
    jobs = [farm.submit(f"Loop {i}:", model=model, max_tokens=1, temperature=0.0) for i in range(n)]
    for job in jobs:
        job.result(timeout=600)
    return n / (time.perf_counter() - started)


def batch_run(model: str, n: int, folder: Path) -> dict[str, float]:
    import farm.batches as batches
    from farm.batches.feeder import start_feeder
    from farm.context import get_context

    path = folder / "batch.jsonl"
    path.write_text(
        "".join(
            json.dumps(
                {
                    "custom_id": f"l{i}",
                    "method": "POST",
                    "url": "/v1/completions",
                    "body": {"model": model, "prompt": f"Line {i}:", "max_tokens": 1},
                }
            )
            + "\n"
            for i in range(n)
        )
    )
    redis = get_context().redis
    before = int(redis.info("memory")["used_memory"])
    started = time.perf_counter()
    batch, _ = batches.submit(path)
    accept_s = time.perf_counter() - started
    memory: list[int] = []
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.5):
            memory.append(int(redis.info("memory")["used_memory"]))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    thread, stop = start_feeder()
    run_started = time.perf_counter()
    quarter = None
    while not (b := batches.get(batch.id)).ended:
        if quarter is None and b.done >= n // 4:
            quarter = max(memory or [before])
        time.sleep(0.5)
    run_s = time.perf_counter() - run_started
    done.set()
    stop.set()
    thread.join(5)
    return {
        "accept_s": accept_s,
        "lines_per_s": b.succeeded / run_s,
        "succeeded": b.succeeded,
        "failed": b.failed,
        "mem_before": before,
        "mem_quarter": quarter or before,
        "mem_max": max(memory or [before]),
        "mem_after": int(redis.info("memory")["used_memory"]),
    }


def gateway_added(model: str, runs: int) -> tuple[float, float, float]:
    import httpx
    from farm_under_bench import free_port

    import farm

    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "farm.cli", "serve", "--port", str(port), "--no-feeder"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit("farm serve did not start")
            time.sleep(0.2)
        http = httpx.Client(base_url=url, timeout=120)
        direct, gateway = [], []
        for i in range(runs + 3):
            t = time.perf_counter()
            farm.infer(f"Ping {i}:", model=model, max_tokens=1, temperature=0.0, priority="high")
            d = time.perf_counter() - t
            t = time.perf_counter()
            r = http.post(
                "/v1/completions",
                json={"model": model, "prompt": f"Pong {i}:", "max_tokens": 1, "temperature": 0},
                headers={"X-Farm-Priority": "high"},
            )
            g = time.perf_counter() - t
            r.raise_for_status()
            if i >= 3:  # warm-up
                direct.append(d * 1000)
                gateway.append(g * 1000)
        added = [g - d for d, g in zip(direct, gateway, strict=True)]
        return statistics.median(direct), statistics.median(gateway), statistics.median(added)
    finally:
        proc.terminate()
        proc.wait(30)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--lines", type=int, default=10_000, help="lines in the batch")
    parser.add_argument("--loop", type=int, default=1000, help="farm.submit calls in the loop")
    parser.add_argument("--direct", type=int, default=200, help="direct 1-token completions")
    parser.add_argument("--runs", type=int, default=40, help="paired gateway/infer calls")
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

    from farm_under_bench import farm_for_bench

    from farm.config import get_settings
    from farm.embedded import DEFAULT_MODEL, default_model_path

    direct = direct_rate(default_model_path(), args.direct)  # before the farm takes the CPU
    folder = Path(tempfile.mkdtemp(prefix="farm-bench-batch-"))
    with farm_for_bench([DEFAULT_MODEL], folder):
        loop = loop_rate(DEFAULT_MODEL, args.loop)
        b = batch_run(DEFAULT_MODEL, args.lines, folder)
        d50, g50, added = gateway_added(DEFAULT_MODEL, args.runs)

    mib = 2**20
    window = get_settings().batch_window
    print(f"1-token completions, model {DEFAULT_MODEL}")
    print(f"  direct llama-cpp-python loop  {direct:8.1f}/s   (1 sequence, {args.direct} calls)")
    print(
        f"  farm.submit loop              {loop:8.1f}/s   ({args.loop} jobs)  x{loop / direct:.2f} direct"
    )
    print(
        f"  batch                         {b['lines_per_s']:8.1f}/s   ({args.lines} lines, "
        f"{b['succeeded']:.0f} succeeded, {b['failed']:.0f} failed)  x{b['lines_per_s'] / direct:.2f} "
        f"direct, x{b['lines_per_s'] / loop:.2f} the submit loop"
    )
    print(f"  check and accept the batch    {b['accept_s']:8.2f}s")
    print(
        f"  Redis used memory (MiB): before {b['mem_before'] / mib:.1f}, at 25% "
        f"{b['mem_quarter'] / mib:.1f}, max during {b['mem_max'] / mib:.1f}, after "
        f"{b['mem_after'] / mib:.1f}  (FARM_BATCH_WINDOW={window})"
    )
    print(
        f"gateway: POST /v1/completions p50 {g50:.1f} ms, farm.infer p50 {d50:.1f} ms, "
        f"added p50 {added:.1f} ms ({args.runs} pairs)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
