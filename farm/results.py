"""The client's handle on a queued job: its state, its place, its text as it streams, its
result, and cancelling it.

A worker writes each job's tokens, then one final event, to the job's stream
(`farm/stream.py`). `Job.stream()` reads the tokens as they arrive and
`Job.result()` waits for the final event; after the stream expired, the result comes from
Celery's result backend.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import redis

from farm.admission import quotas
from farm.completion import Completion
from farm.context import FarmContext, get_context
from farm.depth import queue_place
from farm.errors import FarmUnavailable, JobCancelled, JobFailed, JobTimeout, UnknownJob
from farm.fair import held
from farm.queue import cancel_key, stream_key
from farm.registry import queries, transaction
from farm.registry.tables import TERMINAL_STATUSES
from farm.stream import (
    CANCELLED,
    DONE,
    RECONNECT_WINDOW_S,
    RESTART,
    TERMINAL_EVENTS,
    TOKEN,
    TOOL_CALL,
    last_event,
    publish,
    stream_outcome,
)
from farm.tools.schema import ToolCallDelta


@dataclass(frozen=True)
class Piece:
    """A piece of a job's text as it streams: its choice, its text, and the logprobs of the
    tokens that brought it (None unless the request asked for logprobs); or a piece of one
    of its tool calls."""

    index: int
    text: str
    logprobs: list[dict[str, Any]] | None = None
    tool_call: ToolCallDelta | None = None  # a piece of a tool call (text "")


class Job:
    """A queued job. `farm.submit` returns one; `farm.job(id)` finds one by id."""

    def __init__(self, job_id: str, model: str | None = None, ctx: FarmContext | None = None):
        self.id = job_id
        self.model = model
        self._ctx = ctx or get_context()
        self.completion: Completion | None = None
        # How many times the job started over on another worker while being followed; the
        # stream then repeats text from the start, and `completion.text` is the final run's.
        self.restarts = 0
        self.on_restart: Any = None  # called with the new worker's id, e.g. to tell the user
        # The session's rate-limit state when it was queued (farm/admission/quotas.py), if
        # its session has a rate limit: the gateway's x-ratelimit-* headers.
        self.rate: Any = None

    def __repr__(self) -> str:
        return f"<Job {self.id} model={self.model}>"

    # -- state --------------------------------------------------------------------------------
    def status(self) -> str:
        """queued, running, succeeded, failed, cancelled or expired (from the registry)."""
        self._ctx.flush_rows()
        with transaction(self._ctx.database_url) as s:
            row = queries.get_usage(s, self.id)
            if row is None:
                raise UnknownJob(
                    f"no job with id '{self.id}'; check the id (`farm submit --no-wait` prints one)"
                )
            self.model = row.model
            status = row.status
        if status not in TERMINAL_STATUSES:
            # The worker sends the final event a moment before it writes the usage row.
            status = _redis_call(stream_outcome, self._ctx.redis, self.id) or status
        return status

    def position(self) -> dict[str, Any] | None:
        """While queued: `position` (1 = next), `ahead` (jobs before it per priority) and
        `starts_in_s` (an estimate from the model's recent jobs and live slots, or None);
        None once the job is not waiting in its queue."""
        if self.model is None:
            self.status()  # learns the model
        assert self.model is not None
        return queue_place(self._ctx, self.model, self.id)

    # -- waiting -------------------------------------------------------------------------------
    def result(self, timeout: float | None = None) -> Completion:
        """Wait for the job to end and return its Completion.

        Raises JobFailed (with the worker's reason), JobCancelled, or JobTimeout when
        `timeout` seconds pass first (the job itself goes on).
        """
        for _ in self._events(timeout, tokens=False):
            pass
        assert self.completion is not None
        return self.completion

    def stream(self, timeout: float | None = None) -> Iterator[str]:
        """Yield the job's text piece by piece as the worker generates it.

        After the last piece, `self.completion` holds the Completion.
        """
        for piece in self._events(timeout, tokens=True):
            if piece.tool_call is None:
                yield piece.text

    def pieces(self, timeout: float | None = None) -> Iterator[Piece]:
        """As `stream`, each piece with its choice (a job of several prompts, or n > 1,
        streams its choices interleaved) and, when logprobs were asked for, the logprobs
        of the tokens that brought it; for a request with tools, the pieces of the calls
        the model makes (`Piece.tool_call`, its text empty)."""
        yield from self._events(timeout, tokens=True)

    def _events(self, timeout: float | None, *, tokens: bool) -> Iterator[Piece]:
        r = self._ctx.redis
        key = stream_key(self.id)
        deadline = None if timeout is None else time.monotonic() + timeout
        last = "0"
        next_check = time.monotonic() + 1.0
        lost_since: float | None = None
        while True:
            block_ms = 1000
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise JobTimeout(
                        f"job {self.id} did not finish within {timeout:g}s; it was not "
                        f"cancelled: wait with `farm result {self.id}` or stop it with "
                        f"`farm cancel {self.id}`"
                    )
                block_ms = max(1, min(block_ms, int(left * 1000)))
            try:
                reply: Any = r.xread({key: last}, block=block_ms, count=256)
                if not reply and time.monotonic() >= next_check:
                    # Nothing on the stream: it may have expired long ago, or the job may
                    # have ended without writing to it. Ask the backend and the registry.
                    next_check = time.monotonic() + 5.0
                    if self.settled():
                        return
                lost_since = None
            except redis.ConnectionError as e:
                # A broker restarting (farm up restarts its own) comes back on the same
                # address with the stream: keep waiting for a while before giving up.
                lost_since = lost_since or time.monotonic()
                if time.monotonic() - lost_since > RECONNECT_WINDOW_S:
                    raise FarmUnavailable(
                        f"lost the connection to Redis while waiting, for over "
                        f"{RECONNECT_WINDOW_S:g}s: {e}; the job goes on: follow it with "
                        f"`farm result {self.id}`"
                    ) from e
                time.sleep(0.5)
                continue
            except redis.RedisError as e:
                raise FarmUnavailable(f"lost the connection to Redis while waiting: {e}") from e
            if not reply:
                continue
            for entry_id, fields in reply[0][1]:
                last = entry_id
                piece, ended = self.apply(fields)
                if piece is not None and tokens:
                    yield piece
                if ended:
                    return

    def apply(self, fields: dict[str, str]) -> tuple[Piece | None, bool]:
        """Take one event read off the job's stream: (its Piece, for a token; whether it
        was the final event). A final event sets `completion`, or raises JobCancelled or
        JobFailed. Shared by this blocking reader and the gateway's async one."""
        kind = fields.get("kind")
        if kind == RESTART:
            self.restarts += 1
            if self.on_restart is not None:
                self.on_restart(fields.get("worker"))
        elif kind == TOKEN:
            logprobs = fields.get("logprobs")
            index = int(fields.get("index", 0))
            return Piece(
                index, fields["text"], None if logprobs is None else json.loads(logprobs)
            ), False
        elif kind == TOOL_CALL:
            delta = ToolCallDelta.model_validate_json(fields["delta"])
            return Piece(int(fields.get("index", 0)), "", tool_call=delta), False
        elif kind in TERMINAL_EVENTS:
            self._finish(kind, fields)
            return None, True
        return None, False

    def _finish(self, kind: str, fields: dict[str, str]) -> None:
        if kind == DONE:
            self.completion = Completion.model_validate_json(fields["completion"])
            return
        if kind == CANCELLED:
            raise JobCancelled(f"job {self.id} was cancelled")
        raise JobFailed(f"job {self.id} failed: {fields.get('error', 'no reason given')}")

    def settled(self) -> bool:
        """True when the job's outcome is known elsewhere than its stream (and was applied).

        Redis's own errors pass through, as from the readers' XREAD beside it: a reader
        rides out a lost connection (RECONNECT_WINDOW_S) whichever call meets it."""
        if self._from_backend():
            return True
        event = last_event(self._ctx.redis, self.id)
        if event and event[0] in TERMINAL_EVENTS:
            # Landed between two reads: the stream has the outcome after all.
            self._finish(*event)
            return True
        self._ctx.flush_rows()
        with transaction(self._ctx.database_url) as s:
            row = queries.get_usage(s, self.id)
            status, error = (row.status, row.error) if row else (None, None)
        if status == "cancelled":
            raise JobCancelled(f"job {self.id} was cancelled")
        if status in ("failed", "expired"):
            raise JobFailed(f"job {self.id} {status}: {error or 'no reason recorded'}")
        if status == "succeeded":
            # The worker sends the final event before it writes the row: read the stream
            # again, since both may have landed after the first look.
            event = last_event(self._ctx.redis, self.id)
            if event and event[0] in TERMINAL_EVENTS:
                self._finish(*event)
                return True
            if self._from_backend():
                return True
            raise UnknownJob(
                f"job {self.id} succeeded, but its text is no longer kept (results are kept "
                "for FARM_STREAM_TTL seconds on the stream and 24 hours in the result backend)"
            )
        return False

    def _from_backend(self) -> bool:
        """True when Celery's backend already holds the outcome (and it was applied)."""
        from celery import states

        result = self._ctx.app.AsyncResult(self.id)
        state = result.state
        if state == states.SUCCESS:
            self.completion = Completion.model_validate(result.result)
            return True
        if state == states.FAILURE:
            raise JobFailed(f"job {self.id} failed: {result.result}")
        if state == states.REVOKED:
            raise JobCancelled(f"job {self.id} was cancelled")
        return False

    # -- cancelling ------------------------------------------------------------------------------
    def cancel(self) -> bool:
        """Cancel the job: a queued one never runs, a running one stops at its next token.

        Returns False when the job had already ended.
        """
        ctx = self._ctx
        ctx.flush_rows()
        # Set the flag first: a worker starting the job from now on sees it.
        _redis_call(ctx.redis.set, cancel_key(self.id), "1", ex=ctx.settings.job_expires + 3600)
        with transaction(ctx.database_url) as s:
            row = queries.get_usage(s, self.id)
            if row is None:
                raise UnknownJob(
                    f"no job with id '{self.id}'; check the id (`farm submit --no-wait` prints one)"
                )
            if row.status in TERMINAL_STATUSES:
                return False
            # Still held for its fair turn: out of its session's list now, never dispatched.
            _redis_call(held.withdraw, ctx.broker_redis, row.model, self.id)
            # Only a job no worker has started is cancelled here; a running one sees the flag.
            cancelled_queued = queries.cancel_if_queued(s, job_id=self.id)
        if cancelled_queued:
            publish(ctx.redis, self.id, CANCELLED, ttl=ctx.settings.stream_ttl)
            _redis_call(quotas.settle, ctx, self.id, 0)  # it will never run: give it back
        try:
            # Workers drop revoked ids on receipt; the registry row covers workers that miss it.
            ctx.app.control.revoke(self.id)
        except OSError as e:
            raise FarmUnavailable(
                f"cancelled in the registry, but could not tell workers: {e}"
            ) from e
        return True


def _redis_call(fn: Any, *args: Any, **kwargs: Any) -> Any:
    try:
        return fn(*args, **kwargs)
    except redis.RedisError as e:
        raise FarmUnavailable(f"cannot reach Redis: {e}; is the farm running?") from e
