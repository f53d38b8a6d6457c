"""A job's events written to its Redis stream by the worker, across a broker restart.

The stream's protocol (event kinds, the key, what a reader sees) is `farm.stream`'s; this
module only adds the worker's patience: a Redis that restarts (farm up restarts its
broker) does not fail the job.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, TypeVar

import redis

from farm.stream import RECONNECT_WINDOW_S, publish

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
