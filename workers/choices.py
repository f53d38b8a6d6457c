"""A job's sequences: one per choice (its prompts x n), run together on the engine.

    Request (prompts p0..pk, n) -> for each prompt: a leader and n-1 sequences sharing
                                   its evaluation (Sequence.leader), choice i*n+j
                                -> engine.submit_all: one queue of (choice, kind, value)
                                -> follow: text and logprobs per choice, as they come
                                -> Outcome: every choice's Generation, and the job's
                                   totals (each prompt counted once)

With `echo`, each choice's text starts with its prompt and its logprobs with the prompt's.
"""

from __future__ import annotations

import queue
from dataclasses import dataclass, field
from typing import Any

from workers.engine import Generation
from workers.engine import Sequence as EngineSequence


class _Tagged:
    """A sequence's event sink: its events, tagged with its choice, on the run's queue."""

    def __init__(self, events: queue.SimpleQueue[tuple[int, str, Any]], index: int):
        self.events = events
        self.index = index

    def put(self, event: tuple[str, Any]) -> None:
        self.events.put((self.index, *event))


@dataclass(eq=False)
class Run:
    """A job's sequences on the engine. `cancel` ends all of them."""

    seqs: list[EngineSequence]
    echoes: list[str]  # per choice: the prompt its text starts with ("" without echo)
    events: queue.SimpleQueue[tuple[int, str, Any]] = field(default_factory=queue.SimpleQueue)

    @classmethod
    def of(cls, groups: list[tuple[EngineSequence, str]], n: int, echo: bool) -> Run:
        """A run of `n` sequences per prompt: each group's sequence (the leader) and n-1
        copies of it that share its prompt's evaluation."""
        run = cls(seqs=[], echoes=[])
        for leader, prompt in groups:
            for j in range(n):
                seq = leader if j == 0 else _copy(leader, j)
                if j:
                    seq.leader = leader
                seq.events = _Tagged(run.events, len(run.seqs))
                run.seqs.append(seq)
                run.echoes.append(prompt if echo else "")
        return run

    def cancel(self) -> None:
        for seq in self.seqs:
            seq.cancel()

    @property
    def cancelled(self) -> bool:
        return all(seq.cancelled for seq in self.seqs)

    @property
    def generated(self) -> int:
        return sum(seq.generated for seq in self.seqs)


def _copy(seq: EngineSequence, j: int) -> EngineSequence:
    """The j-th sequence of a prompt: as its leader, with a seed of its own (the same seed
    would draw the same text n times)."""
    sampling = dict(seq.sampling)
    if sampling.get("seed") is not None:
        sampling["seed"] = (int(sampling["seed"]) + j) % 2**32
    return EngineSequence(
        tokens=seq.tokens,
        max_tokens=seq.max_tokens,
        sampling=sampling,
        stops=seq.stops,
        grammar=seq.grammar,
        grammar_lazy=seq.grammar_lazy,
        grammar_patterns=seq.grammar_patterns,
        grammar_tokens=seq.grammar_tokens,
        shown=seq.shown,
        deadline=seq.deadline,
        started=seq.started,
        label=seq.label,
        logprobs=seq.logprobs,
        prompt_logprobs=seq.prompt_logprobs,
        draft_max=seq.draft_max,
        streamed=seq.streamed,
    )


@dataclass
class Outcome(Generation):
    """The job's generation: the first choice's text and finish reason, token counts for
    the whole job (a prompt shared by n sequences counted once), and every choice."""

    choices: list[Generation] = field(default_factory=list)


def outcome(run: Run, generations: list[Generation]) -> Outcome:
    """The job's Outcome from its choices' Generations (in choice order), echo applied."""
    choices = [_echoed(g, run.echoes[i]) for i, g in enumerate(generations)]
    leaders = [g for g, seq in zip(generations, run.seqs, strict=True) if seq.leader is None]
    first = choices[0]
    ttfts = [g.ttft_ms for g in generations if g.ttft_ms is not None]
    return Outcome(
        text=first.text,
        finish_reason=first.finish_reason,
        prompt_tokens=sum(g.prompt_tokens for g in leaders),
        completion_tokens=sum(g.completion_tokens for g in generations),
        ttft_ms=min(ttfts) if ttfts else None,
        generation_ms=max(g.generation_ms for g in generations),
        cached_tokens=sum(g.cached_tokens for g in leaders),
        drafted_tokens=sum(g.drafted_tokens for g in generations),
        drafted_kept=sum(g.drafted_kept for g in generations),
        logprobs=first.logprobs,
        prompt_logprobs=first.prompt_logprobs,
        tool_calls=first.tool_calls,
        choices=choices,
    )


def _echoed(g: Generation, prompt: str) -> Generation:
    """`g` with its prompt in front (text, and logprobs when it has them)."""
    if not prompt:
        return g
    logprobs = g.logprobs
    if logprobs is not None or g.prompt_logprobs is not None:
        shifted = [{**e, "text_offset": e["text_offset"] + len(prompt)} for e in logprobs or []]
        logprobs = list(g.prompt_logprobs or []) + shifted
    return Generation(
        text=prompt + g.text,
        finish_reason=g.finish_reason,
        prompt_tokens=g.prompt_tokens,
        completion_tokens=g.completion_tokens,
        ttft_ms=g.ttft_ms,
        generation_ms=g.generation_ms,
        cached_tokens=g.cached_tokens,
        drafted_tokens=g.drafted_tokens,
        drafted_kept=g.drafted_kept,
        logprobs=logprobs,
        prompt_logprobs=g.prompt_logprobs,
    )
