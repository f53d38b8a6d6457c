"""What farm adds on top of llama.cpp: farm.infer versus calling llama-cpp-python directly.

Both run the same model, prompt and greedy sampling in the same run, one after the other
(never at once: they would share the CPU). The farm side is a whole embedded farm (valkey
broker, SQLite registry, one worker process) started in a temporary folder, or the farm
named by FARM_BROKER_URL / FARM_DATABASE_URL.

    python bench/latency.py [--runs-short 40] [--runs-long 10]

The two calls alternate (direct, farm, direct, farm ...), so that drift in the machine's
speed hits both alike; "added" is the median (and p99) of the per-pair differences.
Prints medians in ms, the added latency, and the ratio farm/direct.
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import sys
import time
from pathlib import Path

PROMPT = "Write a short paragraph about the history of the city of Paris."


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def paired(direct_call, farm_call, runs: int) -> tuple[list[float], list[float], int, int]:
    """Alternate the two calls, so that drift in machine speed hits both alike."""
    direct_call(), farm_call()  # warm both
    d_times, f_times, d_tok, f_tok = [], [], 0, 0
    for _ in range(runs):
        t = time.perf_counter()
        d_tok = direct_call()
        d_times.append((time.perf_counter() - t) * 1000)
        t = time.perf_counter()
        f_tok = farm_call()
        f_times.append((time.perf_counter() - t) * 1000)
    return d_times, f_times, d_tok, f_tok


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--runs-short", type=int, default=40, help="runs of the 1-token completion")
    parser.add_argument("--runs-long", type=int, default=10, help="runs of the 64-token completion")
    args = parser.parse_args()
    runs = {1: args.runs_short, 64: args.runs_long}

    from farm_under_bench import farm_for_bench

    from farm.embedded import DEFAULT_MODEL, default_model_path

    with farm_for_bench([DEFAULT_MODEL]):
        import llama_cpp

        import farm
        from workers.repack import default_repack, model_params

        path = default_model_path()
        print(f"model {DEFAULT_MODEL}: {Path(path).name}", file=sys.stderr)
        # The worker's threads: every core this process may use.
        threads = len(os.sched_getaffinity(0))
        with model_params(repack=default_repack()):  # workers/repack.py
            llm = llama_cpp.Llama(
                model_path=path,
                n_ctx=4096,
                n_gpu_layers=-1,
                n_threads=threads,
                n_threads_batch=threads,
                verbose=False,
            )
        # A new prompt each call: with the same prompt again, llama-cpp-python replays the
        # previous call's logits and evaluates nothing, which no real request gets.
        numbers = itertools.count()
        results = {}
        outside: dict[int, list[float]] = {}  # per call: farm's wall time minus the engine's
        for max_tokens, n in runs.items():

            def direct_call(mt: int = max_tokens) -> int:
                prompt = f"{PROMPT} ({next(numbers)})"
                r = llm.create_completion(prompt, max_tokens=mt, temperature=0.0)
                return int(r["usage"]["completion_tokens"])

            def farm_call(mt: int = max_tokens) -> int:
                prompt = f"{PROMPT} ({next(numbers)})"
                started = time.perf_counter()
                c = farm.infer(
                    prompt, model=DEFAULT_MODEL, max_tokens=mt, temperature=0.0, priority="high"
                )
                wall = (time.perf_counter() - started) * 1000
                outside.setdefault(mt, []).append(wall - c.timings.generation_ms)
                return c.usage.completion_tokens

            results[max_tokens] = paired(direct_call, farm_call, n)
        llm.close()

    print(
        f"{'completion':>10} {'runs':>5} {'tokens':>7} {'direct p50':>11} {'farm p50':>9} "
        f"{'added p50':>10} {'added p99':>10} {'ratio p50':>10}"
    )
    for max_tokens, (dt, ft, dtok, ftok) in results.items():
        added = [f - d for d, f in zip(dt, ft, strict=True)]  # paired: same moment, same load
        d50, f50 = statistics.median(dt), statistics.median(ft)
        print(
            f"{max_tokens:>6} tok {len(dt):>5} {dtok:>3}/{ftok:<3} {d50:>9.1f}ms {f50:>7.1f}ms "
            f"{statistics.median(added):>8.1f}ms {pct(added, 0.99):>8.1f}ms {f50 / d50:>10.3f}"
        )
    print(
        "\nfarm outside the model (wall time of farm.infer minus the engine's generation time: "
        "submit, Celery, registry, stream)"
    )
    for max_tokens, values in outside.items():
        print(
            f"{max_tokens:>6} tok  p50 {statistics.median(values):6.1f}ms  "
            f"p99 {pct(values, 0.99):6.1f}ms"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
