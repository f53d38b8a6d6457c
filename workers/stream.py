"""A job's events written to its Redis stream by the worker, across a broker restart.

The stream's protocol (event kinds, the key, what a reader sees) is `farm.stream`'s; this
module adds the worker's side: patience (a Redis that restarts, as farm up restarts its
broker, does not fail the job), the run keys renewed from one thread (`RunKeeper`), and the
running jobs' tokens written in bulk from one thread (`StreamWriter`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any, TypeVar

import redis

from farm.stream import RECONNECT_WINDOW_S, TOKEN, WRITTEN, Fenced, publish

log = logging.getLogger(__name__)

T = TypeVar("T")


def patiently(call: Callable[[], T]) -> T:
    """`call()`, retried while Redis is unreachable, for RECONNECT_WINDOW_S."""
    deadline, delay = time.monotonic() + RECONNECT_WINDOW_S, 0.1
    while True:
        try:
            return call()
        except (redis.ConnectionError, redis.TimeoutError):
            if time.monotonic() > deadline:
                raise
            time.sleep(delay)
            delay = min(delay * 2, 1.0)


def publish_event(client: redis.Redis, job_id: str, kind: str, **fields: Any) -> None:
    """An event on the job's stream; the write is retried for RECONNECT_WINDOW_S."""
    patiently(lambda: publish(client, job_id, kind, **fields))


class RunKeeper:
    """Renews the run keys of this worker's running jobs from one thread, every `interval`
    seconds, whatever their job threads are doing (a job waiting out a registry outage
    keeps its key). A key another run took is marked `lost`; a worker cut off from Redis,
    or stopped, renews nothing and its keys expire: that is the fence."""

    def __init__(self, client: redis.Redis, interval: float):
        self.client = client  # its own connections, with timeouts: one hung call holds no key
        self.interval = interval
        self._held: set[Fenced] = set()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def hold(self, fence: Fenced) -> None:
        with self._lock:
            self._held.add(fence)
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._renew_forever, name="farm-run-keys", daemon=True
                )
                self._thread.start()

    def drop(self, fence: Fenced) -> None:
        with self._lock:
            self._held.discard(fence)

    def _renew_forever(self) -> None:
        while True:
            time.sleep(self.interval)
            with self._lock:
                held = list(self._held)
            for fence in held:
                try:
                    if not fence.renew(self.client):
                        fence.lost = True
                except redis.RedisError as e:  # the next round tries again; the ttl decides
                    log.debug("run key of job %s not renewed: %s", fence.job_id, e)


WRITE_FAILED = -2  # the outcome `refused` gets when Redis could not take the write


@dataclass(eq=False)
class _Write:
    fence: Fenced
    kind: str
    ttl: int
    fields: dict[str, Any]
    refused: Callable[[int], None]
    number: int = 0  # the job's writes counted from 1: a round sent again writes none twice


class StreamWriter:
    """Writes the tokens of every job this worker runs from one thread, in one pipeline a
    round: whatever the jobs queued while the last round was on the wire goes in the next.
    A job's thread queues its tokens and goes on; it makes no round trip per token, and a
    hundred streaming jobs make one at a time between them (one a token per job made the
    threads queue for connections and the GIL that the engine's thread needs).

    Nothing waits for a timer: a lone token is written as soon as it is queued, so the time
    to the first token does not grow; under load the rounds fill up on their own. Each write
    is fenced as `Fenced.publish` is: a write refused (the job was cancelled, or another run
    holds it) calls the job's `refused(outcome)` from this thread, and so does a write Redis
    could not take (WRITE_FAILED: the job stops, and its `drain` raises the error).
    `drain(fence)` returns once the job's writes so far are on its stream, so that its final
    event follows them. A round that met a lost connection is sent again whole; each write
    carries its number in its job, so what the first try wrote is not written twice.
    """

    def __init__(self, client: redis.Redis):
        self.client = client
        self._queued: list[_Write] = []
        self._cond = threading.Condition()
        self._waiting = Counter[Fenced]()  # writes queued or on the wire, per job
        self._numbers = Counter[Fenced]()  # writes ever queued, per job: their numbers
        self._failed: dict[Fenced, Exception] = {}
        self._thread: threading.Thread | None = None

    def write(
        self, fence: Fenced, kind: str, *, ttl: int, refused: Callable[[int], None], **fields: Any
    ) -> None:
        """Queue an event for the job's stream; returns at once."""
        with self._cond:
            self._numbers[fence] += 1
            self._queued.append(_Write(fence, kind, ttl, fields, refused, self._numbers[fence]))
            self._waiting[fence] += 1
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._write_forever, name="farm-stream-writer", daemon=True
                )
                self._thread.start()
            self._cond.notify_all()

    def drain(self, fence: Fenced) -> None:
        """Wait until the job's queued writes are done; raise the Redis error that ended
        them, if Redis stayed unreachable past RECONNECT_WINDOW_S."""
        with self._cond:
            self._cond.wait_for(lambda: not self._waiting[fence])
            del self._waiting[fence]
            del self._numbers[fence]
            error = self._failed.pop(fence, None)
        if error is not None:
            raise error

    def _write_forever(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: bool(self._queued))
                writes, self._queued = self._queued, []
            outcomes: list[Any]
            try:
                outcomes = patiently(partial(self._round, writes))
            except Exception as e:  # Redis away past the window: every write of the round
                log.warning("%d stream writes lost: %s", len(writes), e)
                outcomes = [e] * len(writes)
            failed: dict[Fenced, Exception] = {}
            for write, outcome in zip(writes, outcomes, strict=True):
                if isinstance(outcome, Exception):  # its job fails (drain raises), at once
                    failed.setdefault(write.fence, outcome)
                    outcome = WRITE_FAILED
                if outcome != WRITTEN:
                    try:
                        write.refused(int(outcome))
                    except Exception:
                        log.exception("job %s: refused write not handled", write.fence.job_id)
            with self._cond:
                for fence, error in failed.items():
                    self._failed.setdefault(fence, error)
                for write in writes:
                    self._waiting[write.fence] -= 1
                self._cond.notify_all()

    def _round(self, writes: list[_Write]) -> list[Any]:
        """One pipeline for the round's writes; returns each write's outcome. A job's
        pieces of text queued one after another go as one event (the reader gets the same
        text, in fewer pieces, when it comes faster than a round trip)."""
        events: list[_Write] = []
        last: dict[Fenced, _Write] = {}  # each job's latest event in this round
        of_write: list[_Write] = []  # the event that carries each write
        for w in writes:
            prev = last.get(w.fence)
            if prev is not None and _joinable(prev, w):
                prev.fields = _joined(prev.fields, w.fields)
                prev.number = w.number  # the event is written once, as the last it holds
            else:
                prev = _Write(w.fence, w.kind, w.ttl, dict(w.fields), w.refused, w.number)
                events.append(prev)
                last[w.fence] = prev
            of_write.append(prev)
        pipe = self.client.pipeline(transaction=False)
        for e in events:
            e.fence.publish_on(pipe, e.kind, ttl=e.ttl, number=e.number, **e.fields)
        # One write's error (a script Redis refused) is that write's outcome, not the round's.
        results = pipe.execute(raise_on_error=False)
        outcome = dict(zip(map(id, events), results, strict=True))
        return [outcome[id(e)] for e in of_write]


def _joinable(a: _Write, b: _Write) -> bool:
    """Two pieces of one choice's text, both with logprobs or both without."""
    return (
        a.kind == b.kind == TOKEN
        and a.fields.get("index") == b.fields.get("index")
        and ("logprobs" in a.fields) == ("logprobs" in b.fields)
    )


def _joined(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    joined = {**a, "text": a["text"] + b["text"]}
    if "logprobs" in a:
        joined["logprobs"] = [*a["logprobs"], *b["logprobs"]]
    return joined
