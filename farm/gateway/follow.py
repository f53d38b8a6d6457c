"""Following a job from the gateway's event loop: its text and its result, read off the
job's stream (farm/stream.py) with redis.asyncio, so that a request waiting for its job
holds no thread, and a client that goes away cancels its job at once, queued or running.

`Job.apply` (farm/results.py) interprets each event, as it does for the blocking reader of
`farm.infer` and the CLI; only the waiting differs. The waiting requests of one event loop
share their readers (`_Reader`): each holds one connection and follows up to SHARD streams
in one blocking XREAD, and hands each request the events of its own stream. A request that
arrives while its reader blocks wakes it with one write to the reader's own wake stream, so
the reader asks again with the new stream among the others. A thousand waiting requests
therefore hold eight connections, not a thousand (each connection kept ~18 KiB that CPython
never gave back: bench/pool_rss.py). Short commands (the key check's GET, the wakes) share a
few connections of their own.

The rare fallback that asks the result backend and the registry (a stream that expired, or
was never written) runs on two threads of its own (CHECKS), 1 s into the wait, then less
and less often: a request whose job waits in the queue costs a thread hop every
SETTLED_MAX_S at most, so
with a thousand of them waiting the loop stays free for /health and new requests (a
one-second XREAD and a check every 5 s made /health's p99 ~350 ms under 1,000 clients).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
import weakref
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, cast

import redis
import redis.asyncio as aioredis

from farm import redis_url
from farm.errors import FarmUnavailable
from farm.queue import stream_key
from farm.results import Job, Piece
from farm.stream import RECONNECT_WINDOW_S, TERMINAL_EVENTS

log = logging.getLogger(__name__)

# Short commands (a key check's GET, a wake) share a few connections, each held ~0.1 ms:
# a pool that grew to one per request in a burst kept them all open, idle, ever after.
SHORT_CONNECTIONS = 32
READER_CONNECTIONS = 4096  # SHARD streams each; Redis's own default limit is 10,000 clients
BLOCK_MS = 10_000  # one XREAD waits at most this long (an event ends it at once)
SHARD = 128  # streams one reader follows in one XREAD (and one connection)
IDLE_CONNECTIONS = 8  # readers' connections kept open for the next readers
SETTLED_FIRST_S = 1.0  # a silent stream is first checked against the backend/registry then,
SETTLED_MAX_S = 15.0  # and again after twice as long each time, up to this
WAKE_TTL_MS = 60_000  # a reader's wake stream outlives it by at most this

Entries = list[tuple[str, dict[str, str]]]

# One async client per event loop and Redis URL: a redis.asyncio connection belongs to the
# loop that opened it (the test client runs each app in a loop of its own).
_clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[str, aioredis.Redis]] = (
    weakref.WeakKeyDictionary()
)


def async_redis(url: str, connect_timeout: float) -> aioredis.Redis:
    """This event loop's client for `url` (the farm's result backend Redis), for short
    commands: at most SHORT_CONNECTIONS at once, a caller past them waits for a free one.
    Following a job's stream with it (`events`) uses connections of the readers' own."""
    per_loop = _clients.setdefault(asyncio.get_running_loop(), {})
    if url not in per_loop:
        short = per_loop[url] = _client(url, connect_timeout, SHORT_CONNECTIONS)
        short._farm_follower = _Follower(  # type: ignore[attr-defined]
            short, _client(url, connect_timeout, READER_CONNECTIONS)
        )
    return per_loop[url]


def _client(url: str, connect_timeout: float, connections: int) -> aioredis.Redis:
    return redis_url.async_client(
        url,
        connect_timeout=connect_timeout,
        # Past the longest XREAD block: redis-py's default (5 s) would cut it short.
        socket_timeout=BLOCK_MS / 1000 + 5,
        decode_responses=True,
        # Past this many, a caller waits for a free one instead of failing (redis-py's
        # pool refuses past 100 by default).
        max_connections=connections,
    )


class _Follow:
    """One request's hold on a stream: the events its reader hands it, in order, and the
    error that ended the reader, if one did."""

    def __init__(self, key: str) -> None:
        self.key = key
        self.last = "0"  # the last entry handed over; the reader asks for what follows
        self.since = time.monotonic()  # a lost connection is ridden out from here at least
        self.events: asyncio.Queue[Entries | FarmUnavailable] = asyncio.Queue()
        self.reader: _Reader | None = None

    def close(self) -> None:
        if self.reader is not None:
            self.reader.drop(self)


class _Reader:
    """One connection following up to SHARD streams in one blocking XREAD; ends (giving the
    connection back) once it follows none."""

    def __init__(self, follower: _Follower) -> None:
        self.follower = follower
        self.follows: dict[str, _Follow] = {}
        self.wake_key = f"farm:gateway:wake:{uuid.uuid4().hex}"
        self.wake_last = "0"
        self.reading = False  # an XREAD is out, which may not name every stream followed
        self.woken = False  # and a wake was sent for it
        self.closed = False
        self.task = asyncio.get_running_loop().create_task(self._run())

    def add(self, follow: _Follow) -> None:
        self.follows[follow.key] = follow
        follow.reader = self
        if self.reading and not self.woken:
            self.woken = True
            self.follower.spawn(self._wake())

    def drop(self, follow: _Follow) -> None:
        # Its stream stays in the XREAD that is out; what comes on it is dropped.
        if self.follows.get(follow.key) is follow:
            del self.follows[follow.key]

    async def _wake(self) -> None:
        try:
            async with self.follower.client.pipeline(transaction=False) as pipe:
                pipe.xadd(self.wake_key, {"w": "1"}, maxlen=1, approximate=False)
                pipe.pexpire(self.wake_key, WAKE_TTL_MS)
                await pipe.execute()
        except redis.RedisError:
            # The XREAD out meets the same trouble; the next one names every stream.
            log.debug("could not wake reader %s", self.wake_key, exc_info=True)

    async def _run(self) -> None:
        conn = self.follower.connection()
        lost_since: float | None = None
        ended = False  # with no command out on `conn`: the next reader may take it over
        try:
            while self.follows:
                streams: dict[Any, Any] = {key: f.last for key, f in self.follows.items()}
                streams[self.wake_key] = self.wake_last
                self.reading, self.woken = True, False
                try:
                    reply: Any = await conn.xread(streams, block=BLOCK_MS, count=256)
                    lost_since = None
                except redis.ConnectionError as e:
                    # A broker restarting (farm up restarts its own) comes back with the
                    # streams: ride it out for a while.
                    now = time.monotonic()
                    lost_since = lost_since or now
                    self._fail(
                        f"lost the connection to Redis while waiting, for over "
                        f"{RECONNECT_WINDOW_S:g}s: {e}; the job goes on",
                        # each request that joined since rides it out as long
                        [
                            f
                            for f in self.follows.values()
                            if now - max(lost_since, f.since) > RECONNECT_WINDOW_S
                        ],
                    )
                    await asyncio.sleep(0.5)
                    continue
                except redis.RedisError as e:
                    self._fail(f"lost the connection to Redis while waiting: {e}")
                    continue
                finally:
                    self.reading = False
                for key, entries in reply or ():
                    if key == self.wake_key:
                        self.wake_last = entries[-1][0]
                        continue
                    follow = self.follows.get(key)
                    if follow is not None and entries:
                        follow.last = entries[-1][0]
                        follow.events.put_nowait(entries)
                        if any(f.get("kind") in TERMINAL_EVENTS for _, f in entries):
                            del self.follows[key]  # the stream ends there
            ended = True
        finally:
            # Taken out of use before the first await, so no request joins a reader that
            # is ending; a request it still follows (the loop is closing, or an error not
            # Redis's ended it) is told, not left waiting.
            self.closed = True
            self.follower.readers.remove(self)
            self._fail("the gateway stopped following the job's stream; the job goes on")
            await self.follower.give_back(conn, reusable=ended)

    def _fail(self, message: str, follows: list[_Follow] | None = None) -> None:
        """Hand each of `follows` (all, by default) the error, and follow them no more."""
        for follow in list(self.follows.values()) if follows is None else follows:
            follow.events.put_nowait(FarmUnavailable(message))
            self.drop(follow)


class _Follower:
    """The readers of one client (one event loop and Redis): `client` for their wakes,
    `reader_client` for their connections."""

    def __init__(self, client: aioredis.Redis, reader_client: aioredis.Redis) -> None:
        self.client = client
        self.reader_client = reader_client
        self.readers: list[_Reader] = []
        self.idle: list[aioredis.Redis] = []  # readers' connections, kept for the next ones
        self._tasks: set[asyncio.Task[None]] = set()

    def connection(self) -> aioredis.Redis:
        """A client on one connection of its own, for a reader: one kept from a reader that
        ended, else a new one. Not `.client()`: a Sentinel client's copy would close the
        sentinels' connections that the pool shares, once done."""
        if self.idle:
            return self.idle.pop()
        pool = self.reader_client.connection_pool
        return aioredis.Redis(connection_pool=pool, single_connection_client=True)

    async def give_back(self, conn: aioredis.Redis, *, reusable: bool) -> None:
        """Keep a reader's client for the next reader (building one costs more than the
        XREAD it sends: ~0.3 ms of the event loop a request); at most IDLE_CONNECTIONS,
        and only one with no command left out on it."""
        if reusable and len(self.idle) < IDLE_CONNECTIONS:
            self.idle.append(conn)
        else:
            await conn.aclose()

    def follow(self, key: str) -> _Follow:
        follow = _Follow(key)
        for reader in self.readers:
            if len(reader.follows) < SHARD and key not in reader.follows and not reader.closed:
                reader.add(follow)
                return follow
        reader = _Reader(self)
        self.readers.append(reader)
        reader.add(follow)
        return follow

    def spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)  # held until done: the loop keeps only weak references
        task.add_done_callback(self._tasks.discard)


def _follower(r: aioredis.Redis) -> _Follower:
    """`r`'s readers (for a client not made by `async_redis`, on its own connections)."""
    follower: _Follower | None = getattr(r, "_farm_follower", None)
    if follower is None:
        follower = _Follower(r, r)
        r._farm_follower = follower  # type: ignore[attr-defined]
    return follower


async def events(job: Job, r: aioredis.Redis, *, tokens: bool) -> AsyncIterator[Piece]:
    """The job's text (when `tokens`) as it is generated, piece by piece, each with its
    choice and logprobs (farm/results.py's Piece); when this ends, `job.completion`
    holds the result, or JobFailed / JobCancelled was raised. Cancelling the task that
    iterates this stops the wait at once (the job itself is cancelled by the caller)."""
    follow = _follower(r).follow(stream_key(job.id))
    applied = "0"  # the last entry applied here
    every = SETTLED_FIRST_S
    check_at = time.monotonic() + every
    try:
        while True:
            settled = False
            try:
                async with asyncio.timeout(max(0.0, check_at - time.monotonic())):
                    got = await follow.events.get()
            except TimeoutError:
                # A silent stream: it may have expired long ago, or the job may have ended
                # without writing to it. Ask the backend and the registry.
                every = min(every * 2, SETTLED_MAX_S)
                try:
                    settled = await asyncio.get_running_loop().run_in_executor(CHECKS, job.settled)
                except redis.ConnectionError:
                    settled = False  # the reader rides out a lost connection, or says so
                except redis.RedisError as e:
                    raise FarmUnavailable(f"lost the connection to Redis while waiting: {e}") from e
                check_at = time.monotonic() + every  # from the check's end: it may queue
                if not settled:
                    continue
                if not tokens:
                    return
                # The text may have come while the check ran: sent, not lost.
                got = await _rest(r, follow, applied)
            if isinstance(got, FarmUnavailable):
                raise got
            check_at = time.monotonic() + every  # checked once silent that long
            for entry_id, fields in got:
                applied = entry_id
                piece, ended = job.apply(fields)
                if piece is not None and tokens:
                    yield piece
                if ended:
                    return
            if settled:
                return
    finally:
        follow.close()


async def _rest(r: aioredis.Redis, follow: _Follow, applied: str) -> Entries:
    """The entries of the followed stream after `applied`, for a job whose outcome its check
    found: what its reader handed over meanwhile, then what is on the stream after that."""
    entries: Entries = []
    while not follow.events.empty():
        got = follow.events.get_nowait()
        if not isinstance(got, FarmUnavailable):
            entries += got
    last = entries[-1][0] if entries else applied
    # If Redis is gone, the outcome is known still; the text in between is what is lost.
    with contextlib.suppress(redis.RedisError):
        entries += cast(Entries, await r.xrange(follow.key, min=f"({last}", max="+"))
    return entries


async def result(job: Job, r: aioredis.Redis) -> None:
    """Wait for the job to end: `job.completion` is set, or the job's error raised."""
    async for _ in events(job, r, tokens=False):
        pass


# The fallback checks of silent streams, on a few threads: a burst of requests comes due
# for its first check at once, and a thousand checks on Starlette's 40 threads held the GIL
# away from the event loop (/health stalled 240-500 ms at 1, 3 and 7 s into the wait).
CHECKS = ThreadPoolExecutor(max_workers=2, thread_name_prefix="gateway-checks")
# Cancels of jobs whose clients went away, on threads of their own: a thread each made a
# storm of hang-ups stall the event loop (Thread.start waits there for the new thread to
# run), and the other pools may be full.
CANCELS = ThreadPoolExecutor(max_workers=8, thread_name_prefix="gateway-cancels")


def cancel_soon(job: Job) -> None:
    """Cancel `job` from a task that is itself being cancelled (its client went away): an
    await here would be cut short, so the cancel is handed to CANCELS and not waited for."""
    CANCELS.submit(_cancel, job)


def _cancel(job: Job) -> None:
    try:
        job.cancel()
    except Exception:  # the job may have just ended, or Redis gone: nothing to tell a client
        log.debug("could not cancel %s", job.id, exc_info=True)
