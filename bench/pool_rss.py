"""What a Redis connection per waiting request costs the gateway's memory, and whether it
comes back: `--waiters` blocking XREADs at once on redis.asyncio's pool (as the gateway's
waiting requests hold them, farm/gateway/follow.py), then the pool disconnected and
emptied, then glibc's malloc_trim. RSS after each.

    python bench/pool_rss.py [--waiters 1000]

Redis: FARM_TEST_REDIS_URL (default redis://127.0.0.1:6379/15); the XREADs are on keys
that do not exist, and each returns after its 300 ms block.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import gc
import os

import psutil

from farm import redis_url

REDIS = os.environ.get("FARM_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")


def rss_mib() -> float:
    return psutil.Process().memory_info().rss / 2**20


async def run(waiters: int) -> None:
    r = redis_url.async_client(
        REDIS, connect_timeout=2, decode_responses=True, max_connections=waiters + 16
    )
    await r.ping()
    print(f"before:                          {rss_mib():6.1f} MiB")
    keys = [f"farm:bench:pool-rss:{i}" for i in range(waiters)]
    await asyncio.gather(*(r.xread({key: "0"}, block=300) for key in keys))
    print(f"after {waiters} XREADs at once:     {rss_mib():6.1f} MiB")
    await r.aclose()
    gc.collect()
    print(f"pool closed, garbage collected:  {rss_mib():6.1f} MiB")
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    print(f"malloc_trim(0):                  {rss_mib():6.1f} MiB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--waiters", type=int, default=1000)
    asyncio.run(run(parser.parse_args().waiters))


if __name__ == "__main__":
    main()
