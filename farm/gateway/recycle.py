"""The gateway child's side of `farm serve`'s replacement (farm/gateway/supervisor.py).

It counts the requests in flight and notes when the last one began or ended; once none has
been in flight for FARM_GATEWAY_RECYCLE_IDLE seconds and its RSS is more than
FARM_GATEWAY_RECYCLE_GROWTH above its RSS when it began to take connections (a fresh
process's: what a replacement comes back to), it asks its supervisor for a fresh process.
A chat's first requests import a little more (the growth left is a load's: bench/README.md).

Replaced (SIGUSR2), it stops accepting at once, answers what it has taken, waits until
nothing has moved for DRAIN_QUIET_S (a connection accepted just before holds its request
by then) or DRAIN_MOST_S have passed (clients that keep a connection alive and busy), and
stops as uvicorn does: a kept-alive connection between two requests is closed (its client
opens a new one, to the new process; one that sends a request at that very moment sees it
closed, as with any server's keep-alive timeout), requests under way are answered.

It tells the supervisor it is alive every CHECK_S; a broken pipe means the supervisor is
gone (SIGKILLed: nobody would replace or stop this process, and it would hold the port),
and it stops.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

log = logging.getLogger(__name__)

CHECK_S = 1.0  # how often the RSS is read and the supervisor told this process is alive
ASK_AGAIN_S = 60.0  # a replacement that did not start is asked for again after this
# Replaced: it stops once nothing has been in flight nor begun for DRAIN_QUIET_S, or after
# DRAIN_MOST_S whatever its kept-alive clients do.
DRAIN_QUIET_S = 1.0
DRAIN_MOST_S = 5.0

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]


def rss_bytes() -> int | None:
    """This process's resident set (Linux's /proc), or None where there is none."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


class RecycleWatch:
    """ASGI middleware that counts requests in flight, and `start(server)`: the checks."""

    def __init__(self, app: Any, notify_fd: int, growth: float, idle_s: float):
        self.app = app
        self.notify_fd = notify_fd
        self.growth = growth
        self.idle_s = idle_s
        self.in_flight = 0
        self.last = time.monotonic()  # when a request last began or ended
        self.floor: int | None = None
        self.tasks: set[asyncio.Task[None]] = set()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        self.in_flight += 1
        self.last = time.monotonic()
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight -= 1
            self.last = time.monotonic()

    def tell(self, message: str) -> bool:
        """Write a line to the supervisor; False when it is gone."""
        try:
            os.write(self.notify_fd, f"{message}\n".encode())
            return True
        except OSError as e:
            log.debug("supervisor not told %r: %s", message, e)
            return False

    def idle_for(self) -> float:
        return 0.0 if self.in_flight else time.monotonic() - self.last

    def start(self, server: Any) -> None:
        """Once the server takes connections: tell the supervisor, watch, and drain on
        SIGUSR2."""
        loop = asyncio.get_running_loop()
        self.floor = rss_bytes()
        self.tell("ready")
        self._spawn(self.watch(server))
        loop.add_signal_handler(signal.SIGUSR2, lambda: self._spawn(self.drain(server)))

    def _spawn(self, coroutine: Any) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def watch(self, server: Any) -> None:
        asked = float("-inf")
        while not server.should_exit:
            await asyncio.sleep(CHECK_S)
            if not self.tell("alive"):
                log.warning("farm serve's supervisor is gone; this gateway process stops")
                server.should_exit = True
                return
            rss = rss_bytes()
            if rss is None or self.floor is None or self.idle_for() < self.idle_s:
                continue
            now = time.monotonic()
            if rss > self.floor * (1 + self.growth) and now - asked >= ASK_AGAIN_S:
                asked = now
                self.tell(f"recycle {rss / 2**20:.0f} {self.floor / 2**20:.0f}")

    async def drain(self, server: Any) -> None:
        """Replaced: accept nothing more, answer what was taken, then stop."""
        for listening in getattr(server, "servers", []):
            listening.close()
        until = time.monotonic() + DRAIN_MOST_S
        while self.idle_for() < DRAIN_QUIET_S and time.monotonic() < until:
            await asyncio.sleep(0.1)
        server.should_exit = True
