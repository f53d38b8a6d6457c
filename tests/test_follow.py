"""The gateway's wait on a job's stream (farm/gateway/follow.py), on the real Redis."""

from __future__ import annotations

import asyncio
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
