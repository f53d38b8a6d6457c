"""farm's Redis URLs, to one server or through Redis Sentinel, and the clients made from them.

Every Redis farm talks to (the broker's queues, the result store, token streams, cancel
flags, run keys, fair share, quotas) is named by FARM_BROKER_URL or FARM_RESULT_URL:

    redis://[:PASSWORD@]HOST:6379/0        one server (rediss:// for TLS)
    sentinel://[:PASSWORD@]HOST1:26379/0;sentinel://HOST2:26379?master_name=NAME
                                           the master that the sentinels know as NAME,
                                           asked of any sentinel listed, and followed to
                                           the replica they promote when it fails

The Sentinel form is Celery's and kombu's (a `;` between sentinels) with one addition: the
master's name, which Celery takes from `broker_transport_options`, is the URL's
`master_name`, so that one setting names the whole broker (and the broker and the result
store may name different masters). The password and the database are the master's; the
sentinels are asked without a password, as kombu and Celery ask them.

`client()` and `async_client()` are the only places farm makes a Redis client from a URL;
`for_celery()` spells a URL as Celery's broker and result backend take it; `check()` is
what the settings run on FARM_BROKER_URL and FARM_RESULT_URL.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, quote, unquote, urlsplit

import redis
import redis.asyncio as aioredis
import redis.asyncio.sentinel as aiosentinel
import redis.sentinel
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import NoBackoff
from redis.retry import Retry

from farm.errors import ConfigError

SENTINEL_SCHEME = "sentinel"
SENTINEL_PORT = 26379
MASTER_NAME = "master_name"
EXAMPLE = "sentinel://host1:26379;sentinel://host2:26379/0?master_name=mymaster"


@dataclass(frozen=True)
class SentinelURL:
    """A parsed `sentinel://` URL: where the sentinels are, the master's name, and the
    database and credentials on that master."""

    sentinels: tuple[tuple[str, int], ...]
    master: str
    db: int = 0
    username: str | None = None
    password: str | None = None

    def master_kwargs(self) -> dict[str, Any]:
        found: dict[str, Any] = {"db": self.db}
        if self.username is not None:
            found["username"] = self.username
        if self.password is not None:
            found["password"] = self.password
        return found


def is_sentinel(url: str) -> bool:
    return url.strip().lower().startswith(f"{SENTINEL_SCHEME}://")


def parse_sentinel(url: str) -> SentinelURL:
    """The parts of a `sentinel://` URL; ConfigError, saying what to write, when it is not
    one farm can use."""
    chunks = [c.strip() for c in url.split(";") if c.strip()]
    if not chunks:
        raise _bad(url, "it names no sentinel")
    sentinels: list[tuple[str, int]] = []
    masters: set[str] = set()
    dbs: set[int] = set()
    creds: set[tuple[str | None, str | None]] = set()
    for chunk in chunks:
        parts = urlsplit(chunk)
        if parts.scheme.lower() != SENTINEL_SCHEME:
            raise _bad(
                url, f"'{parts.scheme}://' in a list of sentinels; every part is sentinel://"
            )
        try:
            port = parts.port or SENTINEL_PORT
        except ValueError:
            raise _bad(url, "a sentinel's port is not a number") from None
        if not parts.hostname:
            raise _bad(url, "a part names no sentinel host")
        sentinels.append((parts.hostname, port))
        for key, value in parse_qsl(parts.query, keep_blank_values=True):
            if key != MASTER_NAME:
                raise _bad(url, f"unknown option '{key}' (a sentinel URL takes {MASTER_NAME} only)")
            if not value:
                raise _bad(url, f"{MASTER_NAME} is empty")
            masters.add(value)
        path = parts.path.strip("/")
        if path:
            if not path.isdigit():
                raise _bad(url, f"the database must be a number, not '{path}'")
            dbs.add(int(path))
        if parts.username or parts.password:
            creds.add((_unquoted(parts.username), _unquoted(parts.password)))
    if not masters:
        raise _bad(
            url,
            f"it names no master: add ?{MASTER_NAME}=NAME, the name your sentinels monitor "
            "(`sentinel monitor NAME host port quorum` in their configuration)",
        )
    for what, found in (("master names", masters), ("databases", dbs), ("passwords", creds)):
        if len(found) > 1:
            raise _bad(url, f"its parts give different {what}; give it once")
    username, password = next(iter(creds), (None, None))
    return SentinelURL(tuple(sentinels), masters.pop(), dbs.pop() if dbs else 0, username, password)


def check(url: str, setting: str) -> None:
    """ConfigError naming `setting` unless `url` is a Redis URL farm can use."""
    if is_sentinel(url):
        try:
            parse_sentinel(url)
        except ConfigError as e:
            raise ConfigError(f"{setting}: {e}") from None


def for_celery(url: str, connect_timeout: float = 3.0) -> tuple[str, dict[str, Any]]:
    """The URL as Celery's broker and result backend take it, and the transport options
    it needs: for Sentinel, the sentinels (`;` between them) with the master's database
    and password on the first, the master's name as the `master_name` option, and how
    the sentinels are asked (`sentinel_kwargs`: once each, as `client()` asks them)."""
    if not is_sentinel(url):
        return url, {}
    s = parse_sentinel(url)
    auth = ""
    if s.username is not None or s.password is not None:
        auth = f"{_quoted(s.username)}:{_quoted(s.password)}@"
    hosts = [f"{_host(host)}:{port}" for host, port in s.sentinels]
    parts = [f"{SENTINEL_SCHEME}://{auth}{hosts[0]}/{s.db}"]
    parts += [f"{SENTINEL_SCHEME}://{host}" for host in hosts[1:]]
    options = {MASTER_NAME: s.master, "sentinel_kwargs": _sentinel_kwargs(connect_timeout)}
    return ";".join(parts), options


def client(url: str, *, connect_timeout: float, **kwargs: Any) -> redis.Redis:
    """A client of the Redis `url` names: its one server, or the master its sentinels name
    now (each new connection asks them again, so a client follows a failover).

    `kwargs` are redis-py's connection options (socket_timeout, decode_responses, ...)."""
    if not is_sentinel(url):
        return redis.Redis.from_url(url, socket_connect_timeout=connect_timeout, **kwargs)
    s = parse_sentinel(url)
    sentinel = redis.sentinel.Sentinel(
        list(s.sentinels), sentinel_kwargs=_sentinel_kwargs(connect_timeout)
    )
    return sentinel.master_for(
        s.master,
        redis_class=_SentinelMaster,
        socket_connect_timeout=connect_timeout,
        **s.master_kwargs(),
        **kwargs,
    )


class _SentinelMaster(redis.Redis):
    """A client of the master Sentinel names; closing it closes its sentinels' clients too."""

    def close(self) -> None:
        super().close()
        for sentinel in self.connection_pool.sentinel_manager.sentinels:  # type: ignore[attr-defined]
            sentinel.close()


class _AsyncSentinelMaster(aioredis.Redis):
    """`_SentinelMaster` for an event loop."""

    async def aclose(self, close_connection_pool: bool | None = None) -> None:
        await super().aclose(close_connection_pool)
        if self.single_connection_client:
            return  # a copy on one of the pool's connections (`.client()`): not the owner
        for sentinel in self.connection_pool.sentinel_manager.sentinels:  # type: ignore[attr-defined]
            await sentinel.aclose()


class _BlockingSentinelPool(aiosentinel.SentinelConnectionPool, aioredis.BlockingConnectionPool):
    """redis.asyncio's Sentinel pool, waiting for a free connection past `max_connections`
    as BlockingConnectionPool does instead of failing."""


def async_client(
    url: str, *, connect_timeout: float, max_connections: int, **kwargs: Any
) -> aioredis.Redis:
    """`client()` for an event loop: at most `max_connections` connections, and a caller
    past them waits for a free one instead of failing."""
    if not is_sentinel(url):
        pool = aioredis.BlockingConnectionPool.from_url(
            url,
            socket_connect_timeout=connect_timeout,
            max_connections=max_connections,
            timeout=None,
            **kwargs,
        )
        return aioredis.Redis(connection_pool=pool)
    s = parse_sentinel(url)
    once = AsyncRetry(NoBackoff(), 0)
    sentinel = aiosentinel.Sentinel(
        list(s.sentinels), sentinel_kwargs=_sentinel_kwargs(connect_timeout, once)
    )
    return sentinel.master_for(
        s.master,
        redis_class=_AsyncSentinelMaster,
        connection_pool_class=_BlockingSentinelPool,
        socket_connect_timeout=connect_timeout,
        max_connections=max_connections,
        timeout=None,
        **s.master_kwargs(),
        **kwargs,
    )


def _sentinel_kwargs(connect_timeout: float, retry: Any = None) -> dict[str, Any]:
    # A sentinel that is down or stopped answering must not hold the caller up: it is
    # asked once (redis-py's default retries a refused connection with backoff, about 4 s
    # per sentinel down), with the connect timeout as its read timeout too (not the
    # master's: a gateway's reads block for seconds on purpose), and the next sentinel
    # listed is asked instead.
    return {
        "socket_connect_timeout": connect_timeout,
        "socket_timeout": connect_timeout,
        "retry": retry or Retry(NoBackoff(), 0),
    }


def _bad(url: str, why: str) -> ConfigError:
    # Not the URL itself: it may hold a password (check() names the setting instead).
    return ConfigError(f"not a Sentinel URL farm can use: {why}; e.g. {EXAMPLE}")


def _host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _unquoted(value: str | None) -> str | None:
    return unquote(value) if value else None


def _quoted(value: str | None) -> str:
    return quote(value or "", safe="")
