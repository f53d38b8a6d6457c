"""The gateway's API-key check, alone: a key the gateway remembers (one Redis GET on the
event loop, farm/gateway/keys.py) against a registry read on the gateway's threads for
every request (what each request paid before), on SQLite and PostgreSQL, one request at a
time and `--clients` at once.

    python bench/key_check.py [--checks 400] [--clients 100]

Redis: FARM_TEST_REDIS_URL (default redis://127.0.0.1:6379/15); PostgreSQL:
FARM_TEST_PG_URL's server (default postgres@127.0.0.1:5432), a scratch database on it.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable

from sqlalchemy import create_engine, make_url, text

from farm import redis_url
from farm.gateway import keys
from farm.gateway.edge import off_loop
from farm.registry import transaction, upgrade

REDIS = os.environ.get("FARM_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
PG = os.environ.get("FARM_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checks", type=int, default=400)
    parser.add_argument("--clients", type=int, default=100)
    args = parser.parse_args()
    server = create_engine(PG, isolation_level="AUTOCOMMIT")
    with server.connect() as c:
        c.execute(text("DROP DATABASE IF EXISTS farm_key_bench WITH (FORCE)"))
        c.execute(text("CREATE DATABASE farm_key_bench"))
    registries = {
        "sqlite": f"sqlite:///{tempfile.mkdtemp(prefix='farm-keys-')}/registry.db",
        "postgresql": make_url(PG).set(database="farm_key_bench").render_as_string(False),
    }
    print(
        f"{'registry':<11} {'check':<22} {'one at a time p50':>18} {'p99':>8}   "
        f"{args.clients} at once: checks/s"
    )
    try:
        for name, url in registries.items():
            upgrade(url)
            with transaction(url) as s:
                key = keys.create(s, "bench")
            asyncio.run(measure(name, url, key, args))
    finally:
        with server.connect() as c:
            c.execute(text("DROP DATABASE IF EXISTS farm_key_bench WITH (FORCE)"))


async def measure(name: str, url: str, key: str, args: argparse.Namespace) -> None:
    r = redis_url.async_client(
        REDIS, connect_timeout=2, decode_responses=True, max_connections=args.clients
    )
    check = keys.KeyCheck(lambda: url, required=False, exposed=False)

    async def registry_read() -> keys.Caller:  # every request, as before
        return await off_loop(check.caller_for, key)

    async def remembered() -> keys.Caller:
        return await check.caller(key, r, off_loop)

    for label, once in (("registry read each time", registry_read), ("remembered", remembered)):
        for _ in range(20):  # warm: the pool's connections, the cache
            assert (await once()).session == "bench"
        times = []
        for _ in range(args.checks):
            t = time.perf_counter()
            await once()
            times.append((time.perf_counter() - t) * 1e6)
        times.sort()

        async def client(n: int, once: Callable[[], Awaitable[keys.Caller]] = once) -> None:
            for _ in range(n):
                await once()

        per_client = max(1, args.checks // 10)
        t = time.perf_counter()
        await asyncio.gather(*(client(per_client) for _ in range(args.clients)))
        rate = args.clients * per_client / (time.perf_counter() - t)
        p50, p99 = statistics.median(times), times[int(0.99 * len(times))]
        print(f"{name:<11} {label:<22} {p50:>15.0f} us {p99:>5.0f} us   {rate:>8.0f}")
    await r.aclose()


if __name__ == "__main__":
    main()
