"""`farm serve` runs its gateway in a child process under a supervisor that holds the port
(farm/gateway/supervisor.py): a child grown by a load is replaced once idle, one that dies
is replaced, and a stop reaches every process. A real `farm serve` in front of the live
farm's worker, real HTTP clients."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis

from farm.queue import BATCH_FEEDER_LOCK
from tests.conftest import MODEL, FarmUnderTest, free_port

pytestmark = pytest.mark.e2e


def children(pid: int) -> list[int]:
    return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for {pid}")


def wait_for(what: str, check, timeout: float = 60):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not (found := check()):
        assert time.monotonic() < deadline, what
        time.sleep(0.1)
    return found


class Serve:
    def __init__(self, farm: FarmUnderTest, **env: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = farm.home / f"serve-{self.port}.log"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "farm.cli", "serve", "--port", str(self.port)],
            env={**farm.env, **env},
            stdout=subprocess.DEVNULL,
            stderr=self.log.open("ab"),
        )
        wait_for("ready", lambda: "farm serve ready" in self.text(), timeout=90)

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def child(self) -> int:
        [pid] = wait_for("one child", lambda: len(kids := children(self.proc.pid)) == 1 and kids)
        return int(pid)


@pytest.fixture
def serve(live_farm: FarmUnderTest) -> Iterator[Serve]:
    s = Serve(live_farm, FARM_GATEWAY_RECYCLE_GROWTH="0.02", FARM_GATEWAY_RECYCLE_IDLE="2")
    yield s
    if s.proc.poll() is None:
        s.proc.terminate()
        s.proc.wait(60)


class Prober:
    """GET /health every 20 ms on a new connection each time (`fresh`), and on one
    connection kept alive (`kept`)."""

    def __init__(self, url: str):
        self.url = url
        self.fresh: list[str] = []  # failures
        self.kept: list[str] = []
        self.answered = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=10) as kept:
            while not self.stop.is_set():
                for get, failures in (
                    (lambda path: httpx.get(self.url + path, timeout=10), self.fresh),
                    (kept.get, self.kept),
                ):
                    try:
                        r = get("/health")
                        assert r.status_code == 200, r.status_code
                        self.answered += 1
                    except (httpx.HTTPError, AssertionError) as e:
                        failures.append(f"{type(e).__name__}: {e}")
                time.sleep(0.02)

    def end(self) -> None:
        self.stop.set()
        self.thread.join(30)


def answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=10).status_code == 200
    except httpx.HTTPError:
        return False


async def load(url: str, n: int) -> list[int]:
    body = {"model": MODEL, "prompt": "Hi", "max_tokens": 1}
    limits = httpx.Limits(max_connections=n)
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as http:
        answers = await asyncio.gather(*(http.post("/v1/completions", json=body) for _ in range(n)))
    return [a.status_code for a in answers]


def test_a_grown_gateway_is_replaced_once_idle_on_the_same_port_refusing_nothing(serve):
    first = serve.child()
    started = rss_mib(first)
    assert set(asyncio.run(load(serve.url, 120))) == {200}
    grown = rss_mib(first)
    assert grown > started * 1.02, (started, grown)  # the load grew it past the setting
    # Idle for FARM_GATEWAY_RECYCLE_IDLE (2 s): the supervisor starts a fresh process.
    wait_for("a replacement starting", lambda: len(children(serve.proc.pid)) == 2, timeout=60)
    # From here on, requests all the time: while the fresh one starts, then takes over.
    prober = Prober(serve.url)
    try:
        line = wait_for(
            "the replacement",
            lambda: [x for x in serve.text().splitlines() if "took over from" in x],
            timeout=90,
        )[0]
        second = serve.child()  # the old one has exited: it drained, with clients busy
        assert second != first and f"process {second} took over from {first}" in line
        assert rss_mib(second) < grown
        assert set(asyncio.run(load(serve.url, 4))) == {200}  # through the same socket
        time.sleep(1)
    finally:
        prober.end()
    assert not prober.fresh, prober.fresh[:5]  # no new connection refused or dropped
    # A kept-alive connection is closed between two requests when its process stops; the
    # client opens a new one. A request sent at that very moment can see the close.
    assert len(prober.kept) <= 1, prober.kept
    assert prober.answered > 50
    assert serve.text().count("farm serve ready") == 1  # the URL is said once
    assert serve.proc.poll() is None


def test_a_gateway_process_that_dies_is_replaced_and_a_stop_reaches_every_process(serve, live_farm):
    first = serve.child()
    os.kill(first, signal.SIGKILL)
    wait_for(
        "the restart",
        lambda: "the gateway process exited with status -9; starting another" in serve.text(),
    )
    second = serve.child()
    assert second != first
    wait_for("it answers", lambda: answers(f"{serve.url}/health"))
    # The child's batch feeder makes its passes under a Redis lock (15 s TTL): a SIGTERM
    # must let it give the lock back, not leave it to expire.
    lock = redis.Redis.from_url(live_farm.broker_url)
    lock.delete(BATCH_FEEDER_LOCK)  # one another module's `farm serve` may have left
    wait_for("the feeder's lock", lambda: lock.exists(BATCH_FEEDER_LOCK))
    serve.proc.send_signal(signal.SIGTERM)
    assert serve.proc.wait(60) == 0
    assert not os.path.exists(f"/proc/{second}")
    assert not lock.exists(BATCH_FEEDER_LOCK)
    with pytest.raises(httpx.ConnectError):  # the port is closed: nothing is left on it
        httpx.get(f"{serve.url}/health", timeout=5)


def test_without_recycling_farm_serve_is_one_process(live_farm):
    s = Serve(live_farm, FARM_GATEWAY_RECYCLE_GROWTH="0")
    try:
        assert children(s.proc.pid) == []
        assert httpx.get(f"{s.url}/health", timeout=10).status_code == 200
    finally:
        s.proc.terminate()
        s.proc.wait(60)
