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
    assert seen["readers_after"] == 0  # every stream ended: no connection held


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
