"""The Completion: what a finished job gives back (its text, why it stopped, its token counts
and timings). Workers build it, the stream and Celery's result backend carry it as JSON, and
clients, the gateway and batch output files read it.

An embeddings job's Completion has no text: `embeddings` holds one vector per input, each
as base64 of little-endian float32 (exact, and a quarter of the size of JSON numbers on
the wire); `vectors()` decodes them."""

from __future__ import annotations

import base64
import struct
from typing import Any

from pydantic import BaseModel

from farm.tools.schema import ToolCall


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    # Of prompt_tokens, those the worker found in its prompt cache and did not evaluate.
    cached_tokens: int = 0


class Timings(BaseModel):
    queue_wait_ms: float
    ttft_ms: float | None
    generation_ms: float
    # Prompt-lookup speculation, all choices together: tokens drafted, and those kept (each
    # kept one saved a step). llama-server reports the same as draft_n / draft_n_accepted.
    drafted_tokens: int = 0
    drafted_kept: int = 0


class Choice(BaseModel):
    """One sequence of a job: a job of several prompts, or n > 1, has one per sequence,
    ordered as OpenAI indexes them (prompt by prompt, n each)."""

    index: int
    text: str
    finish_reason: str
    completion_tokens: int = 0
    # Per token, when logprobs were asked for: {"token", "bytes", "logprob",
    # "top_logprobs": [{"token", "bytes", "logprob"}], "text_offset"}; with echo the
    # prompt's tokens come first (the first with logprob None).
    logprobs: list[dict[str, Any]] | None = None
    tool_calls: list[ToolCall] | None = None  # the calls this choice made (tools requests)


class Completion(BaseModel):
    """A finished job: its text, why it stopped, its token counts and timings.

    `text` and `finish_reason` are the first choice's; `choices` holds every choice when
    the job has more than one or reports logprobs (empty otherwise: see `all_choices`)."""

    job_id: str
    model: str
    text: str  # with tool calls: the text outside them
    finish_reason: str  # stop, length, time
    # The calls the model made, for a request with tools (None without, or when it made none).
    tool_calls: list[ToolCall] | None = None
    usage: Usage
    timings: Timings
    worker: str
    choices: list[Choice] = []
    embeddings: list[str] | None = None  # an embeddings job's vectors (base64 float32 LE)

    def all_choices(self) -> list[Choice]:
        """Every choice: `choices`, or the one the text and finish reason describe."""
        if self.choices:
            return self.choices
        return [
            Choice(
                index=0,
                text=self.text,
                finish_reason=self.finish_reason,
                completion_tokens=self.usage.completion_tokens,
                tool_calls=self.tool_calls,
            )
        ]

    def vectors(self) -> list[list[float]]:
        """An embeddings job's vectors, as floats ([] for a generation)."""
        return [decode_vector(v) for v in self.embeddings or ()]


def encode_vector(values: list[float]) -> str:
    """base64 of the values as little-endian float32, as OpenAI's `encoding_format=base64`."""
    return base64.b64encode(struct.pack(f"<{len(values)}f", *values)).decode("ascii")


def decode_vector(text: str) -> list[float]:
    raw = base64.b64decode(text)
    return list(struct.unpack(f"<{len(raw) // 4}f", raw))


class Embeddings(BaseModel):
    """A finished embeddings job (`farm.embed`): one vector per input, in the inputs' order.

    e = farm.embed(["a cat", "a dog"], model="gemma3-270m")
    e.vectors[0][:4], len(e.vectors), e.usage.prompt_tokens
    """

    job_id: str
    model: str
    vectors: list[list[float]]
    usage: Usage
    timings: Timings
    worker: str

    @classmethod
    def from_completion(cls, c: Completion) -> Embeddings:
        return cls(
            job_id=c.job_id,
            model=c.model,
            vectors=c.vectors(),
            usage=c.usage,
            timings=c.timings,
            worker=c.worker,
        )
