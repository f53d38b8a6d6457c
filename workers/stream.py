"""A job's events written to its Redis stream by the worker, across a broker restart.

The stream's protocol (event kinds, the key, what a reader sees) is `farm.stream`'s; this
module only adds the worker's patience: a Redis that restarts (farm up restarts its
broker) does not fail the job.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

import redis

from farm.stream import RECONNECT_WINDOW_S, Fenced, publish

log = logging.getLogger(__name__)

T = TypeVar("T")


def patiently(call: Callable[[], T]) -> T:
    """`call()`, retried while Redis is unreachable, for RECONNECT_WINDOW_S."""
    deadline, delay = time.monotonic() + RECONNECT_WINDOW_S, 0.1
    while True:
        try:
            return call()
        except (redis.ConnectionError, redis.TimeoutError):
            if time.monotonic() > deadline:
                raise
            time.sleep(delay)
            delay = min(delay * 2, 1.0)


def publish_event(client: redis.Redis, job_id: str, kind: str, **fields: Any) -> None:
    """An event on the job's stream; the write is retried for RECONNECT_WINDOW_S."""
    patiently(lambda: publish(client, job_id, kind, **fields))


class RunKeeper:
    """Renews the run keys of this worker's running jobs from one thread, every `interval`
    seconds, whatever their job threads are doing (a job waiting out a registry outage
    keeps its key). A key another run took is marked `lost`; a worker cut off from Redis,
    or stopped, renews nothing and its keys expire: that is the fence."""

    def __init__(self, client: redis.Redis, interval: float):
        self.client = client  # its own connections, with timeouts: one hung call holds no key
        self.interval = interval
        self._held: set[Fenced] = set()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def hold(self, fence: Fenced) -> None:
        with self._lock:
            self._held.add(fence)
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._renew_forever, name="farm-run-keys", daemon=True
                )
                self._thread.start()

    def drop(self, fence: Fenced) -> None:
        with self._lock:
            self._held.discard(fence)

    def _renew_forever(self) -> None:
        while True:
            time.sleep(self.interval)
            with self._lock:
                held = list(self._held)
            for fence in held:
                try:
                    if not fence.renew(self.client):
                        fence.lost = True
                except redis.RedisError as e:  # the next round tries again; the ttl decides
                    log.debug("run key of job %s not renewed: %s", fence.job_id, e)
