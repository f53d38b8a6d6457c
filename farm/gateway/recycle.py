"""The gateway child's side of `farm serve`'s replacement (farm/gateway/supervisor.py): it
counts the requests in flight, watches its own RSS, and asks its supervisor for a fresh
process once it has served nothing for FARM_GATEWAY_RECYCLE_IDLE seconds and grown more
than FARM_GATEWAY_RECYCLE_GROWTH above its RSS when it began to take connections (a fresh
process's: what a replacement comes back to). Its first requests take a little of that
growth (modules imported on first use: 92 -> 95 MiB on a chat completion, measured in
bench/README.md); the growth left is a load's.

It also stops the child when the supervisor is gone (SIGKILLed: nobody would replace or
stop it, and it would hold the port).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

log = logging.getLogger(__name__)

CHECK_S = 1.0  # how often the RSS and the supervisor are looked at
ASK_AGAIN_S = 60.0  # a replacement that did not start is asked for again after this

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
    """ASGI middleware that counts requests in flight, and `run(server)`: the check."""

    def __init__(self, app: Any, notify_fd: int, growth: float, idle_s: float):
        self.app = app
        self.notify_fd = notify_fd
        self.growth = growth
        self.idle_s = idle_s
        self.in_flight = 0
        self.floor: int | None = None
        self.supervisor = os.getppid()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        self.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight -= 1

    def tell(self, message: str) -> None:
        try:
            os.write(self.notify_fd, f"{message}\n".encode())
        except OSError as e:  # the supervisor is gone: run() stops the server
            log.debug("supervisor not told %r: %s", message, e)

    async def run(self, server: Any) -> None:
        """Until the server stops: ask for a fresh process when this one has grown and is
        idle; stop the server when the supervisor is gone."""
        idle_since: float | None = None
        asked = float("-inf")
        self.floor = rss_bytes()
        while not server.should_exit:
            await asyncio.sleep(CHECK_S)
            if os.getppid() != self.supervisor:
                log.warning("farm serve's supervisor is gone; this gateway process stops")
                server.should_exit = True
                return
            now = time.monotonic()
            if self.in_flight:
                idle_since = None
                continue
            idle_since = idle_since if idle_since is not None else now
            rss = rss_bytes()
            if rss is None or self.floor is None:
                continue
            if (
                now - idle_since >= self.idle_s
                and rss > self.floor * (1 + self.growth)
                and now - asked >= ASK_AGAIN_S
            ):
                asked = now
                self.tell(f"recycle {rss / 2**20:.0f} {self.floor / 2**20:.0f}")
