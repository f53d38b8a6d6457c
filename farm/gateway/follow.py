"""Following a job from the gateway's event loop: its text and its result, read off the
job's stream (farm/stream.py) with redis.asyncio, so that a request waiting for its job
holds no thread, and a client that goes away cancels its job at once, queued or running.

`Job.apply` (farm/results.py) interprets each event, as it does for the blocking reader of
`farm.infer` and the CLI; only the waiting differs. Each waiting request blocks on one
pooled async connection (an XREAD of its own stream); the rare fallback that asks the
result backend and the registry (a stream that expired, or was never written) runs in a
worker thread, 1 s into the wait, then less and less often. A request whose job waits in
the queue costs the event loop one call every BLOCK_MS and a thread hop every SETTLED_MAX_S
at most: with a thousand of them waiting, the loop stays free for /health and new requests
(a one-second XREAD and a check every 5 s made /health's p99 ~350 ms under 1,000 clients).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import weakref
from collections.abc import AsyncIterator
from typing import Any

import anyio
import redis
import redis.asyncio as aioredis

from farm import redis_url
from farm.errors import FarmUnavailable
from farm.queue import stream_key
from farm.results import Job, Piece
from farm.stream import RECONNECT_WINDOW_S

log = logging.getLogger(__name__)

MAX_CONNECTIONS = 4096  # Redis's own default limit is 10,000 clients
BLOCK_MS = 10_000  # one XREAD waits at most this long (an event ends it at once)
SETTLED_FIRST_S = 1.0  # a silent stream is first checked against the backend/registry then,
SETTLED_MAX_S = 15.0  # and again after twice as long each time, up to this

# One async client per event loop and Redis URL: a redis.asyncio connection belongs to the
# loop that opened it (the test client runs each app in a loop of its own).
_clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[str, aioredis.Redis]] = (
    weakref.WeakKeyDictionary()
)


def async_redis(url: str, connect_timeout: float) -> aioredis.Redis:
    """This event loop's client for `url` (the farm's result backend Redis)."""
    per_loop = _clients.setdefault(asyncio.get_running_loop(), {})
    if url not in per_loop:
        per_loop[url] = redis_url.async_client(
            url,
            connect_timeout=connect_timeout,
            # Past the longest XREAD block: redis-py's default (5 s) would cut it short.
            socket_timeout=BLOCK_MS / 1000 + 5,
            decode_responses=True,
            # One per waiting request, reused after; past this many, a request waits for a
            # free one instead of failing (redis-py's pool refuses past 100 by default).
            max_connections=MAX_CONNECTIONS,
        )
    return per_loop[url]


async def events(job: Job, r: aioredis.Redis, *, tokens: bool) -> AsyncIterator[Piece]:
    """The job's text (when `tokens`) as it is generated, piece by piece, each with its
    choice and logprobs (farm/results.py's Piece); when this ends, `job.completion`
    holds the result, or JobFailed / JobCancelled was raised. Cancelling the task that
    iterates this stops the wait at once (the job itself is cancelled by the caller)."""
    key = stream_key(job.id)
    last = "0"
    every = SETTLED_FIRST_S
    check_at = time.monotonic() + every
    lost_since: float | None = None
    while True:
        try:
            # Blocks until an event comes, or the next check of a silent stream is due.
            block_ms = min(BLOCK_MS, max(1, int((check_at - time.monotonic()) * 1000)))
            reply: Any = await r.xread({key: last}, block=block_ms, count=256)
            if not reply and time.monotonic() >= check_at:
                every = min(every * 2, SETTLED_MAX_S)
                check_at = time.monotonic() + every
                if await anyio.to_thread.run_sync(job.settled):
                    return
            lost_since = None
        except redis.ConnectionError as e:
            # A broker restarting (farm up restarts its own) comes back with the stream.
            lost_since = lost_since or time.monotonic()
            if time.monotonic() - lost_since > RECONNECT_WINDOW_S:
                raise FarmUnavailable(
                    f"lost the connection to Redis while waiting, for over "
                    f"{RECONNECT_WINDOW_S:g}s: {e}; the job goes on"
                ) from e
            await asyncio.sleep(0.5)
            continue
        except redis.RedisError as e:
            raise FarmUnavailable(f"lost the connection to Redis while waiting: {e}") from e
        if not reply:
            continue
        check_at = time.monotonic() + every  # checked once silent that long
        for entry_id, fields in reply[0][1]:
            last = entry_id
            piece, ended = job.apply(fields)
            if piece is not None and tokens:
                yield piece
            if ended:
                return


async def result(job: Job, r: aioredis.Redis) -> None:
    """Wait for the job to end: `job.completion` is set, or the job's error raised."""
    async for _ in events(job, r, tokens=False):
        pass


def cancel_soon(job: Job) -> None:
    """Cancel `job` from a task that is itself being cancelled (its client went away): on a
    thread of its own, as an await here would be cut short and the thread pool may be full
    of submits."""
    threading.Thread(target=_cancel, args=(job,), name=f"cancel-{job.id}", daemon=True).start()


def _cancel(job: Job) -> None:
    try:
        job.cancel()
    except Exception:  # the job may have just ended, or Redis gone: nothing to tell a client
        log.debug("could not cancel %s", job.id, exc_info=True)
