"""The Completion: what a finished job gives back (its text, why it stopped, its token counts
and timings). Workers build it, the stream and Celery's result backend carry it as JSON, and
clients, the gateway and batch output files read it."""

from __future__ import annotations

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


class Completion(BaseModel):
    """A finished job: its text, why it stopped, its token counts and timings."""

    job_id: str
    model: str
    text: str  # with tool calls: the text outside them
    finish_reason: str  # stop, length, time
    # The calls the model made, for a request with tools (None without, or when it made none).
    tool_calls: list[ToolCall] | None = None
    usage: Usage
    timings: Timings
    worker: str
