"""The connections one process keeps: settings, the Celery app, Redis and the registry URL.

Built lazily on first use and shared by the client, the CLI and the worker, so that every
part of a process talks to the same farm with the same transport options.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING

from redis import Redis

from farm import redis_url
from farm.config import Settings, get_settings, reset_settings

if TYPE_CHECKING:
    from celery import Celery

    from farm.registry.recorder import QueuedRows


@dataclass
class FarmContext:
    settings: Settings
    # model -> (monotonic expiry, context size): models recently seen served by a live worker.
    servable: dict[str, tuple[float, int]] = field(default_factory=dict)
    # model -> (serves embeddings, the dimensions it allows), beside `servable`
    embeds: dict[str, tuple[bool, tuple[int, ...]]] = field(default_factory=dict)
    # session -> (monotonic expiry, its quota limits or None)
    quotas: dict[str, tuple[float, object]] = field(default_factory=dict)
    # model -> [monotonic expiry, queue depth read, jobs this process queued since]
    depth: dict[str, list[float]] = field(default_factory=dict)

    @cached_property
    def broker_url(self) -> str:
        return self.settings.resolved_broker_url()

    @cached_property
    def result_url(self) -> str:
        return self.settings.resolved_result_url()

    @cached_property
    def database_url(self) -> str:
        return self.settings.existing_database_url()

    @cached_property
    def app(self) -> Celery:
        from farm.broker import make_app  # Celery: imported by the commands that send

        return make_app(self.settings, self.broker_url, self.result_url)

    @cached_property
    def recorder(self) -> QueuedRows:
        """Writes the usage rows of this process's queued jobs, batched, behind submit."""
        from farm.registry.recorder import QueuedRows  # SQLAlchemy: only for commands that submit

        return QueuedRows(self.database_url)

    def flush_rows(self, timeout: float = 10.0) -> None:
        """Let this process's queued jobs reach the registry before reading it (waiting at
        most `timeout` seconds)."""
        if "recorder" in self.__dict__:
            self.recorder.flush(timeout)

    @cached_property
    def redis(self) -> Redis:
        """Redis for token streams and cancel flags (the result backend's server)."""
        return redis_url.client(
            self.result_url, connect_timeout=self.settings.connect_timeout, decode_responses=True
        )

    @cached_property
    def broker_redis(self) -> Redis:
        """Redis holding the queues themselves (kombu's lists), for their depth and order:
        the result backend's server too, unless FARM_RESULT_URL names another."""
        if self.result_url == self.broker_url:
            return self.redis
        return redis_url.client(
            self.broker_url, connect_timeout=self.settings.connect_timeout, decode_responses=True
        )


_context: FarmContext | None = None


def get_context() -> FarmContext:
    global _context
    if _context is None:
        _context = FarmContext(get_settings())
    return _context


def reset_context() -> None:
    """Forget settings and connections (after the environment changed)."""
    global _context
    if _context is not None and "app" in _context.__dict__:
        _context.app.close()
    _context = None
    reset_settings()
