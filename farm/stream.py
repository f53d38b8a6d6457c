"""A job's stream: the protocol workers write and clients read, on one Redis stream per job
(`queue.stream_key(job_id)`).

A worker appends a `token` event per piece of text, `restart` when the job starts over on
another worker (the text then repeats from the start), and one final event: `done` (with the
Completion as JSON), `failed` (with the reason) or `cancelled`. `Job.cancel` writes
`cancelled` itself for a job that never started.
"""

from __future__ import annotations

import json
from typing import Any

import redis

from farm.queue import stream_key

# Event kinds on a job's stream.
TOKEN, DONE, FAILED, CANCELLED = "token", "done", "failed", "cancelled"
RESTART = "restart"  # the worker running the job was lost; another starts it over
TERMINAL_EVENTS = (DONE, FAILED, CANCELLED)
# How long a reader (or a worker publishing) rides out a lost connection to Redis.
RECONNECT_WINDOW_S = 30.0

_OUTCOMES = {DONE: "succeeded", FAILED: "failed", CANCELLED: "cancelled"}


def last_event(r: redis.Redis, job_id: str) -> tuple[str, dict[str, str]] | None:
    """The kind and fields of the last event on a job's stream, if it has one."""
    last: Any = r.xrevrange(stream_key(job_id), count=1)
    return (last[0][1].get("kind", ""), last[0][1]) if last else None


def stream_outcome(r: redis.Redis, job_id: str) -> str | None:
    """succeeded, failed or cancelled when the job's stream ends with its final event."""
    event = last_event(r, job_id)
    return _OUTCOMES.get(event[0]) if event else None


def publish(
    r: redis.Redis, job_id: str, kind: str, *, ttl: int | None = None, **fields: Any
) -> None:
    """Append one event to a job's stream; with `ttl`, (re)set the stream's expiry too.

    Used by workers, and by `Job.cancel` for a job that never started.
    """
    payload = {"kind": kind}
    payload.update({k: v if isinstance(v, str) else json.dumps(v) for k, v in fields.items()})
    key = stream_key(job_id)
    if ttl is None:
        r.xadd(key, payload)  # type: ignore[arg-type]
        return
    pipe = r.pipeline(transaction=False)
    pipe.xadd(key, payload)  # type: ignore[arg-type]
    pipe.expire(key, ttl)
    pipe.execute()
