"""What following waiting requests' streams costs the gateway's memory, and whether it
comes back: `--waiters` requests waiting at once, each for its own stream, then the pool
disconnected and emptied, then glibc's malloc_trim. RSS after each, for the two ways:

- `each`: a blocking XREAD per request on redis.asyncio's pool, a connection each (the
  gateway before its shared readers);
- `shared`: farm/gateway/follow.py's readers, each following up to SHARD streams on one
  connection.

    python bench/pool_rss.py [--waiters 1000]

Each way runs in a process of its own. Redis: FARM_TEST_REDIS_URL (default
redis://127.0.0.1:6379/15); each stream gets its final event 300 ms in.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import gc
import os
import subprocess
import sys
import uuid

import psutil

from farm import redis_url
from farm.gateway import follow
from farm.queue import stream_key

REDIS = os.environ.get("FARM_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")


def rss_mib() -> float:
    return psutil.Process().memory_info().rss / 2**20


async def run(waiters: int, way: str) -> None:
    from farm.config import Settings
    from farm.context import FarmContext
    from farm.errors import JobCancelled
    from farm.results import Job

    r = redis_url.async_client(
        REDIS,
        connect_timeout=2,
        decode_responses=True,
        max_connections=waiters + 16,
        socket_timeout=follow.BLOCK_MS / 1000 + 5,
    )
    await r.ping()
    ctx = FarmContext(Settings())
    ids = [f"farm-bench-pool-rss-{uuid.uuid4()}" for _ in range(waiters)]
    print(f"{way}: before                          {rss_mib():6.1f} MiB")

    async def each(job_id: str) -> None:
        await r.xread({stream_key(job_id): "0"}, block=follow.BLOCK_MS)

    async def shared(job_id: str) -> None:
        with contextlib.suppress(JobCancelled):
            await follow.result(Job(job_id, ctx=ctx), r)

    wait = each if way == "each" else shared
    waiting = asyncio.gather(*(wait(i) for i in ids))
    await asyncio.sleep(0.3)
    for i in ids:
        await r.xadd(stream_key(i), {"kind": "cancelled"})
    await waiting
    print(f"{way}: after {waiters} waited at once        {rss_mib():6.1f} MiB")
    await asyncio.sleep(0.2)  # the shared readers give their connections back
    await r.delete(*[stream_key(i) for i in ids])
    await r.aclose()
    gc.collect()
    print(f"{way}: pool closed, garbage collected  {rss_mib():6.1f} MiB")
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    print(f"{way}: malloc_trim(0)                  {rss_mib():6.1f} MiB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--waiters", type=int, default=1000)
    parser.add_argument("--way", choices=("each", "shared"), help="one way only, here")
    args = parser.parse_args()
    if args.way:
        asyncio.run(run(args.waiters, args.way))
        return
    for way in ("each", "shared"):
        cmd = [sys.executable, __file__, "--waiters", str(args.waiters), "--way", way]
        subprocess.run(cmd, check=True)


if __name__ == "__main__":
    main()
