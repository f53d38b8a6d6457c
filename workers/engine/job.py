"""The engine's boundary: a Sequence goes in, events come out.

The job's own thread (a Celery task thread) builds a Sequence from a tokenized request,
hands it to `Engine.submit`, and reads `Sequence.events` until the final one:

    ("text", str)            a piece of generated text, safe to show
    ("logprobs", dict)       a token's logprobs, before the text it brings (when asked for)
                             (neither of these two for a sequence that is not `streamed`)
    ("done", Generation)     the end: text, finish reason, token counts, timings
    ("failed", str)          the engine could not serve it (the reason)

`cancel()` may be called from any thread; the engine stops the sequence before its next
token. Nothing above this module knows about slots, batches or ctypes.
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

TEXT, DONE, FAILED, LOGPROBS = "text", "done", "failed", "logprobs"


@dataclass
class Generation:
    text: str
    finish_reason: str  # stop, length, time, cancelled
    prompt_tokens: int
    completion_tokens: int
    ttft_ms: float | None
    generation_ms: float
    cached_tokens: int = 0
    # With Sequence.logprobs: one entry per generated token (logprobs.entry's shape).
    logprobs: list[dict[str, Any]] | None = None
    # With Sequence.prompt_logprobs: one per prompt token after a leading BOS, the first None.
    prompt_logprobs: list[dict[str, Any]] | None = None
    # Prompt-lookup speculation: tokens drafted for this sequence, and those kept.
    drafted_tokens: int = 0
    drafted_kept: int = 0
    tool_calls: list[Any] | None = None  # set by the host for a request with tools
    embeddings: list[list[float]] | None = None  # an embeddings job's vectors, one per input


@dataclass(eq=False)
class Sequence:
    """One request as the engine sees it."""

    tokens: list[int]
    max_tokens: int
    sampling: dict[str, Any] = field(default_factory=dict)
    stops: tuple[str, ...] = ()
    grammar: str | None = None
    # A lazy grammar waits for a trigger: a full-match pattern on the text so far (it
    # applies from the pattern's first group), or one of these tokens.
    grammar_lazy: bool = False
    grammar_patterns: tuple[str, ...] = ()
    grammar_tokens: tuple[int, ...] = ()
    # Control tokens shown as text for this sequence (a family's tool-call markers).
    shown: frozenset[int] = frozenset()
    deadline: float | None = None  # time.perf_counter() value
    started: float = field(default_factory=time.perf_counter)
    label: str = ""  # for logs: the job id
    # A sequence with the same tokens whose prompt evaluation this one shares (n > 1): the
    # engine copies its KV cells instead of evaluating the prompt again, when it can.
    leader: Sequence | None = None
    logprobs: int | None = None  # report each token's logprob and this many alternatives
    prompt_logprobs: bool = False  # and the prompt's tokens' (echo): every position evaluated
    # Prompt-lookup speculation: the most tokens drafted a step from the sequence's own
    # tokens (lookup.py); 0: none; None: the engine's default.
    draft_max: int | None = None
    # False: the engine puts no "text" or "logprobs" events, only the last one (its
    # Generation holds the whole text and logprobs). For a reader that does not show the
    # text as it comes: its thread is then not woken at every token.
    streamed: bool = True
    generated: int = 0  # tokens so far, written by the engine thread
    # Where the engine puts this sequence's events: anything with put((kind, value)); a
    # SimpleQueue unless the sequence is one choice of several (workers/choices.py).
    events: Any = field(default_factory=queue.SimpleQueue)
    _cancelled: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> None:
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()


class SequenceRunner(Protocol):
    """What runs Sequences behind a host: the Engine, or its in-memory twin (twin.py)."""

    tokens_generated: int  # since start, for tokens/s in the heartbeat
    kv_size: int

    def submit(self, seq: Sequence) -> None: ...

    def submit_all(self, seqs: list[Sequence]) -> None:
        """Queue sequences together: a leader and the sequences sharing its prompt."""
        ...

    @property
    def alive(self) -> bool: ...

    def close(self) -> None: ...
