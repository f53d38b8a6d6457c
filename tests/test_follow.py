"""The gateway's wait on a job's stream (farm/gateway/follow.py), on the real Redis."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from typing import Any

from farm.gateway import follow


def test_a_wait_longer_than_redis_pys_read_timeout_is_not_cut_short(redis_url):
    """A request whose job stays queued blocks on one XREAD for up to BLOCK_MS; redis-py's
    async connections give up reading after 5 s by default, and such requests got a 503
    ("Timeout reading from ...") under load."""
    block_ms = min(follow.BLOCK_MS, 6000)
    assert block_ms > 5000  # past redis-py's default, or this test proves nothing

    async def wait() -> tuple[Any, float]:
        r = follow.async_redis(redis_url, 1.0)
        started = time.monotonic()
        reply = await r.xread({f"farm-test-silent-{uuid.uuid4()}": "0"}, block=block_ms)
        return reply, time.monotonic() - started

    reply, waited = asyncio.run(wait())
    assert not reply  # nothing was written: the block ran out, no error
    assert waited >= block_ms / 1000 - 0.1


def _follow_all(redis_url: str, jobs: int, name: str, during: Any) -> dict[str, Any]:
    """Follow `jobs` streams at once through one client named `name`; `during(r, ids)` runs
    while they all wait, then each stream gets a token and its final event."""
    from farm import redis_url as urls
    from farm.config import Settings
    from farm.context import FarmContext
    from farm.errors import JobCancelled
    from farm.queue import stream_key
    from farm.results import Job

    ctx = FarmContext(Settings())
    ids = [f"farm-test-follow-{uuid.uuid4()}" for _ in range(jobs)]

    async def run() -> dict[str, Any]:
        r = urls.async_client(
            redis_url,
            connect_timeout=1.0,
            max_connections=follow.READER_CONNECTIONS,
            socket_timeout=follow.BLOCK_MS / 1000 + 5,
            decode_responses=True,
            client_name=name,
        )
        texts: dict[str, str] = {}

        async def one(job_id: str) -> None:
            text = ""
            try:
                async for piece in follow.events(Job(job_id, ctx=ctx), r, tokens=True):
                    text += piece.text
            except JobCancelled:
                texts[job_id] = text

        waiting = [asyncio.ensure_future(one(i)) for i in ids]
        seen = await during(r, ids)
        for i in ids:
            await r.xadd(stream_key(i), {"kind": "token", "text": f"t-{i}"})
            await r.xadd(stream_key(i), {"kind": "cancelled"})
        async with asyncio.timeout(30):
            await asyncio.gather(*waiting)
        await asyncio.sleep(0.1)  # the readers give their connections back
        seen["readers_after"] = len(follow._follower(r).readers)
        seen["connections_after"] = sum(c.get("name") == name for c in await r.client_list())
        seen["texts"] = texts
        await r.delete(*[stream_key(i) for i in ids])
        await r.aclose()
        return seen

    return asyncio.run(run())


def test_a_thousand_waiting_requests_share_a_few_connections(redis_url, monkeypatch):
    """Each reader follows up to SHARD streams in one XREAD: the waiting requests of a
    gateway hold a connection per SHARD of them, not one each, and every request still gets
    its own stream's events, in full."""
    # Not the backend's view of a silent stream: there is no farm behind these jobs.
    monkeypatch.setattr(follow, "SETTLED_FIRST_S", 60.0)
    jobs, name = 1000, f"farm-test-{uuid.uuid4().hex[:8]}"

    async def during(r: Any, ids: list[str]) -> dict[str, Any]:
        await asyncio.sleep(1.0)  # every reader has sent its XREAD
        clients = [c for c in await r.client_list() if c.get("name") == name]
        return {
            "connections": len(clients),
            "blocked": sum(c.get("cmd") == "xread" and "b" in c.get("flags", "") for c in clients),
        }

    seen = _follow_all(redis_url, jobs, name, during)
    readers = -(-jobs // follow.SHARD)
    assert seen["blocked"] == readers
    assert seen["connections"] <= readers + 2  # the readers, CLIENT LIST's, a wake's at most
    assert seen["texts"] == {i: f"t-{i}" for i in seen["texts"]} and len(seen["texts"]) == jobs
    assert seen["readers_after"] == 0  # every stream ended: no reader left
    # Their connections: a few kept for the next readers (and CLIENT LIST's), no more.
    assert seen["connections_after"] <= follow.IDLE_CONNECTIONS + 1


def test_requests_one_after_another_reuse_one_reader_client(redis_url):
    """A reader that ends keeps its client (and connection) for the next reader: building a
    client cost the event loop more than the XREAD it sends (~0.3 ms a request)."""
    from farm.errors import JobCancelled
    from farm.queue import stream_key

    async def run() -> tuple[set[int], int]:
        r = follow.async_redis(redis_url, 1.0)
        follower = follow._follower(r)
        used: set[int] = set()
        for _ in range(20):
            job = _job(f"farm-test-follow-{uuid.uuid4()}")
            waiting = asyncio.ensure_future(follow.result(job, r))
            await asyncio.sleep(0.05)  # its reader's XREAD is out
            await r.xadd(stream_key(job.id), {"kind": "cancelled"})
            with contextlib.suppress(JobCancelled):
                async with asyncio.timeout(10):
                    await waiting
            await asyncio.sleep(0.01)  # the reader ends, and gives its client back
            used |= {id(c) for c in follower.idle}
            await r.delete(stream_key(job.id))
        return used, len(follower.idle)

    used, idle = asyncio.run(run())
    assert len(used) == 1 and idle == 1, (used, idle)


def test_a_request_that_arrives_while_its_reader_waits_is_followed_at_once(redis_url, monkeypatch):
    """The reader is blocked on an XREAD that does not name the new request's stream: the
    new request wakes it (well inside BLOCK_MS, after which it would have asked again)."""
    from farm.config import Settings
    from farm.context import FarmContext
    from farm.errors import JobCancelled
    from farm.queue import stream_key
    from farm.results import Job

    monkeypatch.setattr(follow, "SETTLED_FIRST_S", 60.0)
    ctx = FarmContext(Settings())
    first, second = (f"farm-test-follow-{uuid.uuid4()}" for _ in range(2))

    async def run() -> float:
        r = follow.async_redis(redis_url, 1.0)
        waiting = asyncio.ensure_future(follow.result(Job(first, ctx=ctx), r))
        await asyncio.sleep(0.5)  # its reader blocks on the first stream alone
        assert len(follow._follower(r).readers) == 1
        later = asyncio.ensure_future(follow.result(Job(second, ctx=ctx), r))
        await asyncio.sleep(0.2)
        started = time.monotonic()
        await r.xadd(stream_key(second), {"kind": "cancelled"})
        try:
            async with asyncio.timeout(follow.BLOCK_MS / 1000 / 2):
                await later
        except JobCancelled:
            pass
        took = time.monotonic() - started
        await r.xadd(stream_key(first), {"kind": "cancelled"})
        with contextlib.suppress(JobCancelled):
            await waiting
        await r.delete(stream_key(first), stream_key(second))
        return took

    took = asyncio.run(run())
    assert took < follow.BLOCK_MS / 1000 / 2


def test_a_burst_of_short_commands_keeps_few_connections_open(redis_url):
    """A thousand requests arriving at once each read the key token (one GET): redis-py's
    pool kept a connection per request open, idle, ever after. Short commands share
    SHORT_CONNECTIONS."""
    url = redis_url.rsplit("/", 1)[0] + "/13"  # a database of its own: its clients counted

    async def run() -> int:
        r = follow.async_redis(url, 1.0)
        await asyncio.gather(*(r.get(f"farm-test-burst-{i}") for i in range(500)))
        return sum(c.get("db") == "13" for c in await r.client_list())

    assert follow.SHORT_CONNECTIONS < 100  # else the burst proves nothing
    assert asyncio.run(run()) <= follow.SHORT_CONNECTIONS


def _job(job_id: str) -> Any:
    from farm.config import Settings
    from farm.context import FarmContext
    from farm.results import Job

    return Job(job_id, ctx=FarmContext(Settings()))


async def _text(job: Any, r: Any, into: list[str] | None = None) -> str:
    """The job's text; `into` gets each piece as it comes (kept if the job then fails)."""
    into = [] if into is None else into
    async for piece in follow.events(job, r, tokens=True):
        into.append(piece.text)
    return "".join(into)


def test_a_lost_connection_is_ridden_out_per_request_then_reported(redis_url, monkeypatch):
    """Redis gone (a proxy cut): a request waiting since before gets FarmUnavailable once
    the outage outlasts RECONNECT_WINDOW_S; one that joined the same reader during the
    outage has its own window, and once Redis is back it gets its stream's text."""
    import redis as sync_redis

    from farm.errors import FarmUnavailable, JobCancelled
    from farm.queue import stream_key
    from tests.proxy import Proxy

    monkeypatch.setattr(follow, "SETTLED_FIRST_S", 60.0)
    monkeypatch.setattr(follow, "RECONNECT_WINDOW_S", 3.0)
    proxy = Proxy("127.0.0.1", 6379)
    db = redis_url.rsplit("/", 1)[1]
    direct = sync_redis.Redis.from_url(redis_url, decode_responses=True)
    first, second = (f"farm-test-follow-{uuid.uuid4()}" for _ in range(2))

    async def run() -> tuple[str, float, str]:
        r = follow.async_redis(f"redis://127.0.0.1:{proxy.port}/{db}", 1.0)
        waiting = asyncio.ensure_future(_text(_job(first), r))
        await asyncio.sleep(0.3)  # its reader blocks
        proxy.cut()
        cut = time.monotonic()
        await asyncio.sleep(2.0)
        got: list[str] = []
        joined = asyncio.ensure_future(_text(_job(second), r, got))
        outcome = "no error"
        try:
            async with asyncio.timeout(10):
                await waiting
        except FarmUnavailable as e:
            outcome = str(e)
        failed_after = time.monotonic() - cut
        assert not joined.done()  # its window is its own
        proxy.restore()
        direct.xadd(stream_key(second), {"kind": "token", "text": "back"})
        direct.xadd(stream_key(second), {"kind": "cancelled"})
        with contextlib.suppress(JobCancelled):
            async with asyncio.timeout(10):
                await joined
        return outcome, failed_after, "".join(got)

    try:
        outcome, failed_after, text = asyncio.run(run())
    finally:
        proxy.cut()
    assert "lost the connection to Redis while waiting, for over 3s" in outcome
    assert failed_after >= 3.0
    assert text == "back"
    direct.delete(stream_key(first), stream_key(second))


def test_text_that_came_while_the_silent_stream_check_ran_is_not_lost(redis_url, monkeypatch):
    """The check of a silent stream finds the job's outcome; the text that reached the
    stream while the check ran (queued behind other checks) is still sent first."""
    import redis as sync_redis

    from farm.queue import stream_key
    from farm.results import Job

    monkeypatch.setattr(follow, "SETTLED_FIRST_S", 0.2)
    direct = sync_redis.Redis.from_url(redis_url, decode_responses=True)
    job_id = f"farm-test-follow-{uuid.uuid4()}"

    class Ended(Job):
        def settled(self) -> bool:
            # The text lands while the check runs; its reader hands part of it over.
            direct.xadd(stream_key(self.id), {"kind": "token", "text": "hello "})
            time.sleep(0.3)
            direct.xadd(stream_key(self.id), {"kind": "token", "text": "world"})
            return True

    async def run() -> str:
        r = follow.async_redis(redis_url, 1.0)
        return await _text(Ended(job_id, ctx=_job(job_id)._ctx), r)

    assert asyncio.run(run()) == "hello world"
    direct.delete(stream_key(job_id))
