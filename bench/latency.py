"""What farm adds on top of llama.cpp: farm.infer versus calling llama-cpp-python directly.

Both run the same model, prompt and greedy sampling in the same run, one after the other
(never at once: they would share the CPU). The farm side is a whole embedded farm (valkey
broker, SQLite registry, one worker process) started in a temporary folder, or the farm
named by FARM_BROKER_URL / FARM_DATABASE_URL.

    python bench/latency.py [--runs-short 40] [--runs-long 10]

Prints medians and p99s in ms, the added latency, and the ratio farm/direct.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

PROMPT = "Write a short paragraph about the history of the city of Paris."


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def time_calls(fn, runs: int) -> tuple[list[float], int]:
    fn()  # warm
    times, tokens = [], 0
    for _ in range(runs):
        t = time.perf_counter()
        tokens = fn()
        times.append((time.perf_counter() - t) * 1000)
    return times, tokens


def direct(path: str, n_ctx: int, runs: dict[int, int]) -> dict[int, tuple[list[float], int]]:
    import llama_cpp

    llm = llama_cpp.Llama(model_path=path, n_ctx=n_ctx, n_gpu_layers=-1, verbose=False)
    out = {}
    for max_tokens, n in runs.items():

        def call(mt: int = max_tokens) -> int:
            r = llm.create_completion(PROMPT, max_tokens=mt, temperature=0.0)
            return int(r["usage"]["completion_tokens"])

        out[max_tokens] = time_calls(call, n)
    llm.close()
    return out


def through_farm(model: str, runs: dict[int, int]) -> dict[int, tuple[list[float], int]]:
    import farm

    out = {}
    for max_tokens, n in runs.items():

        def call(mt: int = max_tokens) -> int:
            c = farm.infer(PROMPT, model=model, max_tokens=mt, temperature=0.0, priority="high")
            return c.usage.completion_tokens

        out[max_tokens] = time_calls(call, n)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--runs-short", type=int, default=40, help="runs of the 1-token completion")
    parser.add_argument("--runs-long", type=int, default=10, help="runs of the 64-token completion")
    args = parser.parse_args()
    runs = {1: args.runs_short, 64: args.runs_long}

    from farm.config import get_settings
    from farm.context import reset_context
    from farm.embedded import DEFAULT_MODEL, EmbeddedFarm, default_model_path

    embedded = None
    if not os.environ.get("FARM_BROKER_URL"):
        home = tempfile.mkdtemp(prefix="farm-bench-")
        os.environ["FARM_HOME"] = home
        reset_context()
        embedded = EmbeddedFarm(
            get_settings(), [DEFAULT_MODEL], say=lambda m: print(m, file=sys.stderr)
        )
        embedded.start()
        os.environ["FARM_BROKER_URL"] = embedded.broker_url
        reset_context()
    try:
        path = default_model_path()
        print(f"model {DEFAULT_MODEL}: {Path(path).name}", file=sys.stderr)
        d = direct(path, 4096, runs)
        f = through_farm(DEFAULT_MODEL, runs)
    finally:
        if embedded is not None:
            embedded.stop()

    print(
        f"{'completion':>12} {'runs':>5} {'tokens':>7} {'direct p50':>11} {'farm p50':>9} "
        f"{'added p50':>10} {'direct p99':>11} {'farm p99':>9} {'added p99':>10} {'ratio':>6}"
    )
    for max_tokens in runs:
        (dt, dtok), (ft, ftok) = d[max_tokens], f[max_tokens]
        d50, f50 = statistics.median(dt), statistics.median(ft)
        d99, f99 = pct(dt, 0.99), pct(ft, 0.99)
        print(
            f"{max_tokens:>9} tok {len(dt):>5} {dtok:>3}/{ftok:<3} {d50:>9.1f}ms {f50:>7.1f}ms "
            f"{f50 - d50:>8.1f}ms {d99:>9.1f}ms {f99:>7.1f}ms {f99 - d99:>8.1f}ms {f50 / d50:>6.3f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
