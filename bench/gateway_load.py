"""The gateway under load: many clients waiting at once, and clients that hang up.

Against a real farm (embedded unless FARM_BROKER_URL is set) running Gemma 3 270M, with
`farm serve` in its own process, all on 127.0.0.1:

1. added latency: `farm.infer` and the same one-token request through the gateway, one
   at a time; the gateway's p50 over farm.infer's, through httpx (what most users' tools
   run on) and through a plain HTTP/1.1 client (asyncio streams on one keep-alive
   connection: what the gateway adds, with less of the client's own work);
2. load: `--streams` streaming and `--waits` non-streaming clients at once (httpx, async),
   for at most `--seconds`; /health polled every 50 ms meanwhile (p99 and max), and the
   gateway's RSS before, during and after. Requests still waiting at the bound hang up
   (their jobs are cancelled: that is part of the load);
3. hang-ups: `--hangups` streaming clients each hang up at a random moment, queued or
   running; the time from hanging up to the job's `cancelled` event on its stream (p50,
   max), and whether any such job still ran to its end.

    python bench/gateway_load.py --streams 500 --waits 500 --seconds 60 --hangups 100
    python bench/gateway_load.py --streams 0 --waits 0 --hangups 0 --latency-runs 100  # 1. alone
    python bench/gateway_load.py --hangups 0 --warm 150 --rounds 2  # the RSS after 300, 1000, 1000

`--key`: the farm has an API key and every request sends it (the gateway checks it on
each request); without it, a laptop's farm that never had keys. FARM_DATABASE_URL chooses
the registry (PostgreSQL, say); the embedded farm's SQLite otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from farm_under_bench import farm_for_bench, free_port

MODEL = "gemma3-270m"
HI = [{"role": "user", "content": "Say hi."}]
STORY = [{"role": "user", "content": "Write a long story about the sea."}]
HEADERS: dict[str, str] = {}  # every gateway request's: the API key with --key


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", type=int, default=500)
    parser.add_argument("--waits", type=int, default=500)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--hangups", type=int, default=100)
    parser.add_argument("--max-tokens", type=int, default=4)
    parser.add_argument("--latency-runs", type=int, default=30)
    parser.add_argument("--key", action="store_true", help="requests send an API key")
    parser.add_argument(
        "--rounds", type=int, default=1, help="the load that many times (is the RSS bounded?)"
    )
    parser.add_argument(
        "--warm",
        type=int,
        default=0,
        help="first, a load of this many streaming and this many non-streaming clients, "
        "bounded at 10 s (does the RSS after follow the largest load, or each load?)",
    )
    parser.add_argument(
        "--settle",
        type=float,
        default=20.0,
        help="seconds after a load before the RSS after it is read (FARM_GATEWAY_RECYCLE_IDLE, "
        "10 s by default, and a new process's start must fit in it)",
    )
    args = parser.parse_args()
    with farm_for_bench([MODEL]):
        if args.key:
            from farm.context import get_context
            from farm.gateway import keys
            from farm.registry import transaction

            with transaction(get_context().database_url) as s:
                HEADERS["authorization"] = f"Bearer {keys.create(s, 'bench')}"
        port = free_port()
        log = open(Path(os.environ["FARM_HOME"]) / "gateway.log", "ab")  # noqa: SIM115
        gateway = subprocess.Popen(
            [sys.executable, "-m", "farm.cli", "serve", "--port", str(port), "--no-feeder"],
            stdout=subprocess.DEVNULL,
            stderr=log,
        )
        try:
            asyncio.run(run(f"http://127.0.0.1:{port}", gateway.pid, args))
        finally:
            gateway.terminate()
            gateway.wait(30)


def probe(url: str) -> None:
    """`--probe URL`: GET /health every 50 ms until terminated, printing for each the
    seconds since the first and the time it took in ms (-1 for a failure)."""
    import signal

    import httpx

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    started = time.perf_counter()
    with httpx.Client(base_url=url, timeout=30) as http:
        while True:
            t = time.perf_counter()
            try:
                ok = http.get("/health").status_code == 200
            except httpx.HTTPError:
                ok = False
            took = (time.perf_counter() - t) * 1000 if ok else -1
            print(f"{t - started:.2f} {took}", flush=True)
            time.sleep(0.05)


def tree(pid: int) -> list[Any]:
    """`farm serve`'s processes: the supervisor and its gateway child (or children, while
    one replaces another: farm/gateway/supervisor.py), or the one process without it."""
    import psutil

    top = psutil.Process(pid)
    return [top, *top.children(recursive=True)]


def each(pid: int, read: Any) -> list[float]:
    """`read` of each of `farm serve`'s processes; 0 for one that exited meanwhile."""
    import psutil

    found = []
    for process in tree(pid):
        try:
            found.append(float(read(process)))
        except psutil.NoSuchProcess:
            found.append(0.0)
    return found


def rss_mib(pid: int) -> float:
    """The RSS of `farm serve`, all of its processes together."""
    return sum(each(pid, lambda p: p.memory_info().rss)) / 2**20


def cpu_s(pid: int) -> float:
    return sum(each(pid, lambda p: sum(p.cpu_times()[:2])))


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


async def run(url: str, pid: int, args: argparse.Namespace) -> None:
    import httpx

    async with httpx.AsyncClient(base_url=url, timeout=10, headers=HEADERS) as http:
        deadline = time.monotonic() + 120
        while True:
            try:
                if (await http.get("/health")).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "farm serve did not start"
            await asyncio.sleep(0.2)
    if args.latency_runs:
        await added_latency(url, pid, args.latency_runs)
    if args.warm:
        print("warm-up:")
        warm = {"streams": args.warm, "waits": args.warm, "seconds": 10.0}
        await load(url, pid, argparse.Namespace(**{**vars(args), **warm}))
    for _ in range(args.rounds if args.streams or args.waits else 0):
        await load(url, pid, args)
    if args.hangups:
        await hangups(url, args.hangups)


async def added_latency(url: str, pid: int, runs: int) -> None:
    import httpx

    import farm

    body = {"model": MODEL, "messages": HI, "max_tokens": 1, "temperature": 0}
    direct, through = [], []
    async with httpx.AsyncClient(base_url=url, timeout=120, headers=HEADERS) as http:
        for _ in range(3):  # warm both paths
            await asyncio.to_thread(farm.infer, messages=HI, model=MODEL, max_tokens=1)
            await http.post("/v1/chat/completions", json=body)
        for _ in range(runs):
            t = time.perf_counter()
            await asyncio.to_thread(
                farm.infer, messages=HI, model=MODEL, max_tokens=1, temperature=0
            )
            direct.append((time.perf_counter() - t) * 1000)
            t = time.perf_counter()
            r = await http.post("/v1/chat/completions", json=body)
            assert r.status_code == 200, r.text
            through.append((time.perf_counter() - t) * 1000)
        health = []
        for _ in range(runs):
            t = time.perf_counter()
            await http.get("/health")
            health.append((time.perf_counter() - t) * 1000)
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    payload = json.dumps(body).encode()
    head = "".join(f"{k}: {v}\r\n" for k, v in HEADERS.items())
    chat = (
        f"POST /v1/chat/completions HTTP/1.1\r\nhost: {host}\r\n{head}"
        f"content-type: application/json\r\ncontent-length: {len(payload)}\r\n\r\n"
    ).encode() + payload
    get_health = f"GET /health HTTP/1.1\r\nhost: {host}\r\n\r\n".encode()

    async def plain(request: bytes) -> float:
        t = time.perf_counter()
        writer.write(request)
        answer = await reader.readuntil(b"\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 200"), answer
        length = next(
            int(line.split(b":")[1])
            for line in answer.lower().split(b"\r\n")
            if line.startswith(b"content-length:")
        )
        await reader.readexactly(length)
        return (time.perf_counter() - t) * 1000

    direct_again, plain_through, plain_health, cpu = [], [], [], 0.0
    for _ in range(runs):
        t = time.perf_counter()
        await asyncio.to_thread(farm.infer, messages=HI, model=MODEL, max_tokens=1, temperature=0)
        direct_again.append((time.perf_counter() - t) * 1000)
        before = cpu_s(pid)
        plain_through.append(await plain(chat))
        cpu += cpu_s(pid) - before
    for _ in range(runs):
        plain_health.append(await plain(get_health))
    writer.close()
    d, g = statistics.median(direct), statistics.median(through)
    d2, p = statistics.median(direct_again), statistics.median(plain_through)
    print(f"added latency ({runs} one-token chats, one at a time):")
    print(f"  farm.infer p50 {d:.1f} ms, through the gateway p50 {g:.1f} ms: +{g - d:.1f} ms")
    print(f"  the HTTP floor: GET /health p50 {statistics.median(health):.2f} ms")
    print(f"  with a plain HTTP/1.1 client: farm.infer p50 {d2:.1f} ms, through the gateway")
    print(
        f"  p50 {p:.1f} ms: +{p - d2:.1f} ms; GET /health p50 {statistics.median(plain_health):.2f} ms"
    )
    print(f"  the gateway's CPU (all its threads) per chat: {cpu / runs * 1000:.2f} ms")


async def load(url: str, pid: int, args: argparse.Namespace) -> None:
    import httpx

    errors: list[str] = []
    done = {"stream": 0, "wait": 0}
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    body = {"model": MODEL, "messages": HI, "max_tokens": args.max_tokens}

    async def streaming(http: httpx.AsyncClient) -> None:
        async with http.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:
            if r.status_code != 200:
                errors.append(f"stream {r.status_code}: {(await r.aread())[:200]!r}")
                return
            async for line in r.aiter_lines():
                if '"error"' in line:
                    errors.append(f"stream error event: {line[:200]}")
                if line == "data: [DONE]":
                    done["stream"] += 1

    async def waiting(http: httpx.AsyncClient) -> None:
        r = await http.post("/v1/chat/completions", json=body)
        if r.status_code != 200:
            errors.append(f"wait {r.status_code}: {r.text[:200]}")
        else:
            done["wait"] += 1

    rss = {"before": rss_mib(pid), "peak": 0.0}
    # /health is probed from a process of its own, so the clients' work here never delays it.
    prober = subprocess.Popen(
        [sys.executable, __file__, "--probe", url], stdout=subprocess.PIPE, text=True
    )

    async def guarded(call: Any) -> None:
        try:
            await call
        except asyncio.CancelledError:
            raise
        except Exception as e:  # a transport error is an error of the load
            errors.append(f"{type(e).__name__}: {e}")

    started = time.monotonic()
    async with httpx.AsyncClient(
        base_url=url, timeout=None, limits=limits, headers=HEADERS
    ) as http:
        calls = [asyncio.create_task(guarded(streaming(http))) for _ in range(args.streams)]
        calls += [asyncio.create_task(guarded(waiting(http))) for _ in range(args.waits)]
        pending = set(calls)
        bound = time.monotonic() + args.seconds
        while pending and time.monotonic() < bound:
            _, pending = await asyncio.wait(pending, timeout=0.5)
            rss["peak"] = max(rss["peak"], rss_mib(pid))
        for call in pending:
            call.cancel()  # the bound: these clients hang up
        await asyncio.gather(*pending, return_exceptions=True)
    prober.terminate()
    probes = [line.split() for line in (prober.communicate()[0] or "").splitlines()]
    timed = [(float(took), float(at)) for at, took in probes]
    errors += [f"health probe failed {at:.1f}s in" for took, at in timed if took < 0]
    health = [took for took, _ in timed if took >= 0]
    slowest = sorted(timed, reverse=True)[:5]
    took = time.monotonic() - started
    # The cancelled jobs drain; with recycling, the grown gateway process is replaced once
    # it has served nothing for FARM_GATEWAY_RECYCLE_IDLE seconds (--settle).
    await asyncio.sleep(args.settle)
    rss["after"] = rss_mib(pid)
    parts = " + ".join(f"{b / 2**20:.0f}" for b in each(pid, lambda p: p.memory_info().rss))
    print(
        f"load: {args.streams} streaming + {args.waits} non-streaming clients at once, "
        f"max_tokens {args.max_tokens}, bound {args.seconds:g}s:"
    )
    print(
        f"  ended in {took:.1f}s: {done['stream']} streams and {done['wait']} waits complete, "
        f"{len(pending)} hung up at the bound, {len(errors)} errors"
    )
    for e in errors[:5]:
        print(f"    {e}")
    print(
        f"  /health while they waited ({len(health)} probes): p50 {pct(health, 0.5):.1f} ms, "
        f"p99 {pct(health, 0.99):.1f} ms, max {max(health):.1f} ms"
    )
    print(
        "    the slowest: "
        + ", ".join(f"{took:.0f} ms {at:.1f}s in" for took, at in slowest)
        + f" (the bound: {args.seconds:g}s in)"
    )
    print(
        f"  gateway RSS: before {rss['before']:.0f} MiB, peak {rss['peak']:.0f} MiB, "
        f"after {rss['after']:.0f} MiB ({(rss['after'] / rss['before'] - 1) * 100:+.0f} %; "
        f"by process, the supervisor first: {parts}) {args.settle:g} s after the load"
    )


async def hangups(url: str, n: int) -> None:
    import httpx

    from farm.context import get_context
    from farm.gateway.follow import async_redis
    from farm.queue import stream_key
    from farm.registry import queries, transaction
    from farm.stream import CANCELLED, TERMINAL_EVENTS

    ctx = get_context()
    r = async_redis(ctx.result_url, ctx.settings.connect_timeout)
    rng = random.Random(7)
    to_cancel: list[float] = []
    job_ids: list[str] = []
    not_cancelled: list[str] = []
    body = {"model": MODEL, "messages": STORY, "max_tokens": 300, "stream": True}

    async def one(http: httpx.AsyncClient) -> None:
        await asyncio.sleep(rng.uniform(0, 3))
        async with http.stream("POST", "/v1/chat/completions", json=body) as resp:
            job_id = resp.headers["x-request-id"]
            job_ids.append(job_id)
            stay = rng.uniform(0.05, 2.0)
            try:
                async with asyncio.timeout(stay):
                    async for _ in resp.aiter_lines():
                        pass
            except TimeoutError:
                pass
        hung_up = time.monotonic()  # the connection is closed here
        last = "0"
        while True:
            reply: Any = await r.xread({stream_key(job_id): last}, block=5000)
            assert reply, f"no final event for {job_id} within 5 s of hanging up"
            for entry, fields in reply[0][1]:
                last = entry
                if fields.get("kind") in TERMINAL_EVENTS:
                    if fields["kind"] == CANCELLED:
                        to_cancel.append((time.monotonic() - hung_up) * 1000)
                    else:
                        not_cancelled.append(job_id)
                    return

    limits = httpx.Limits(max_connections=None, max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits, headers=HEADERS) as http:
        await asyncio.gather(*(one(http) for _ in range(n)))
    await asyncio.sleep(2)
    with transaction(ctx.database_url) as s:
        rows = [queries.get_usage(s, j) for j in job_ids]
        ran_out = [x.job_id for x in rows if x is not None and x.completion_tokens >= 300]
    print(f"hang-ups: {n} streaming clients hang up after 0.05-2 s (queued or running):")
    print(
        f"  hang-up to the job's cancelled event: p50 {pct(to_cancel, 0.5):.0f} ms, "
        f"max {max(to_cancel):.0f} ms; {len(not_cancelled)} ended otherwise, "
        f"{len(ran_out)} ran to their end"
    )
    print(json.dumps({"cancelled": len(to_cancel), "other": not_cancelled[:5]}))


if __name__ == "__main__":
    if sys.argv[1:2] == ["--probe"]:
        probe(sys.argv[2])
    else:
        main()
