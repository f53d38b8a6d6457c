"""API keys: created once and shown once, kept as SHA-256 digests, each mapped to a session;
and the gateway's rule for who may call it. The registry's queries on keys are in
farm/registry/queries/keys.py.

The rule, checked on every request:

- a live key is its session's;
- a revoked key is refused (401), always: never taken for a farm without keys;
- with no key in the registry at all and keys not required by FARM_GATEWAY_REQUIRE_KEYS,
  any request (with whatever key a tool sends) is session `default`: a laptop;
- once a key was ever created, revoked or not, every request needs a live key (401);
- a gateway listening beyond loopback refuses every request (503) while no key is live.

A key found live is remembered by its digest, so that a busy gateway does not read the
registry on every request (about 1 ms on PostgreSQL, on a thread: bench/key_check.py). Revocation stays
immediate: `farm keys revoke` (`revoke` below) commits, then sets a new token in Redis
(farm:keys:version), and each request reads that token first (one GET on the event loop);
a gateway that sees it change forgets every key it remembered and its count of keys. A key
changed in the registry some other way (by SQL) is seen within CACHE_MAX_AGE seconds.

An admin key (`farm keys create --admin`) may also read the farm's status (/farm/status:
what `farm status` shows). Nothing else may, a farm that never had keys included: a
loopback gateway may be reached through a proxy or a tunnel, and its operator has `farm
status` on the machine itself.
"""

from __future__ import annotations

import asyncio
import hashlib
import secrets
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import redis

from farm.queue import keys_version_key
from farm.registry import transaction
from farm.registry.queries import keys as stored

if TYPE_CHECKING:
    import redis.asyncio as aioredis
    from sqlalchemy.orm import Session

KEY_PREFIX = "farm-"
CREATE_HINT = "`farm keys create --session NAME` makes one"
STATE_TTL = 1.0  # seconds the gateway trusts its count of keys: one cheap read a second
CACHE_MAX_AGE = 60.0  # seconds a remembered key is trusted without a registry read
CACHE_SIZE = 10_000  # keys remembered at most, the least recently used forgotten first
TOKEN_READ_S = 0.25  # a token read slower than this is not waited for: the registry is read
TOKEN_SYNC_S = 2.0  # how long `revoke` waits for the new token to be on Redis's disk


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def create(s: Session, session: str, *, admin: bool = False) -> str:
    """A new key for `session`; the only time its text exists outside the caller."""
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    stored.add(s, prefix=key[:12], digest=digest(key), session=session, admin=admin)
    return key


def revoke(database_url: str, prefix: str, redis_client: Callable[[], redis.Redis]) -> int | None:
    """Revoke the live keys starting with `prefix` and tell every gateway: how many were
    revoked (0: all were already, and gateways are told again), None for no such key.

    The registry first, then a new token in `redis_client()`, so that no gateway can
    remember the key again after reading the token; the token's errors come after the
    revocation is committed (run it again to tell the gateways)."""
    with transaction(database_url) as s:
        n = stored.revoke(s, prefix)
        if not n and not stored.with_prefix(s, prefix):
            return None
    r = redis_client()
    r.set(keys_version_key(), uuid.uuid4().hex)
    try:  # a Redis that crashed now must not come back with the old token
        on_disk, _ = r.execute_command("WAITAOF", 1, 0, int(TOKEN_SYNC_S * 1000))
    except redis.ResponseError:  # no append-only file to come back from (or Redis < 7.2)
        return n
    if not on_disk:
        raise redis.TimeoutError(
            f"the new token did not reach Redis's append-only file within {TOKEN_SYNC_S:g}s"
        )
    return n


@dataclass(frozen=True)
class Caller:
    """Who a request is: the session its usage goes to, and whether it may read the farm's
    status (a live admin key)."""

    session: str
    admin: bool


class KeyRefused(Exception):
    """A request the key rule turns away: `status` 401 (the caller's key) or 503 (the
    gateway has no live key to check against)."""

    def __init__(self, status: int, message: str, code: str):
        super().__init__(message)
        self.status = status
        self.code = code


class KeyCheck:
    """The key rule above for one gateway. `database_url` is read on each use (the farm's
    context decides it); `exposed`: the gateway listens beyond loopback."""

    def __init__(self, database_url: Callable[[], str], *, required: bool, exposed: bool) -> None:
        self._database_url = database_url
        self.required = required
        self.exposed = exposed
        self._lock = threading.Lock()
        self._counts: tuple[int, int] = (0, 0)
        self._read_at = -float("inf")
        self._refreshing = threading.Event()  # a background read of the counts is under way
        self._known: OrderedDict[str, tuple[Caller, float]] = OrderedDict()  # digest -> caller
        self._version: str | None = None  # the token the remembered keys were read under
        self._redis_back_at = 0.0  # after a failed token read: Redis is not asked before

    def counts(self, s: Session | None = None) -> tuple[int, int]:
        """(keys ever created, keys live): read in `s` when given, else at most STATE_TTL
        seconds old (a request without a key costs no query on a busy laptop farm). The lock
        guards only the cached pair, never a registry read: a thread holding a connection
        and waiting for the lock, and one holding the lock and waiting for a connection,
        would stall each other with a small pool."""
        if s is None:
            with self._lock:
                if time.monotonic() - self._read_at < STATE_TTL:
                    return self._counts
            with transaction(self._database_url()) as fresh:
                read = stored.counts(fresh)
        else:
            read = stored.counts(s)
        with self._lock:
            self._counts, self._read_at = read, time.monotonic()
            return self._counts

    def keys_required(self, *, wait: bool = True) -> bool:
        """Whether a request needs a key. `wait=False` (for /health, on the event loop)
        answers from memory and, when that is older than STATE_TTL, refreshes it in the
        background for the next caller."""
        if self.required or self.exposed:
            return True
        if wait or self._read_at == -float("inf"):
            return self.counts()[0] > 0
        if time.monotonic() - self._read_at >= STATE_TTL and not self._refreshing.is_set():
            self._refreshing.set()
            threading.Thread(target=self._refresh, name="key-counts", daemon=True).start()
        return self._counts[0] > 0

    def _refresh(self) -> None:
        try:
            self.counts()
        except Exception:  # the registry is away: /health still answers, from memory
            pass
        finally:
            self._refreshing.clear()

    async def caller(
        self,
        token: str,
        r: aioredis.Redis | None,
        off_loop: Callable[..., Awaitable[tuple[Caller, bool]]],
    ) -> Caller:
        """`caller_for` for the event loop: a key remembered under the current token (read
        from `r`) costs no registry read; otherwise the registry is read through
        `off_loop`."""
        if not self.required and not self.exposed and self._never_had_keys():
            return (await off_loop(self._lookup, token))[0]  # a laptop's: nothing to remember
        version = await self._current_version(r)
        with self._lock:
            if version != self._version:  # a revoke, a new Redis, or none to read
                if version is not None and self._version is not None:
                    self._read_at = -float("inf")  # the count of keys too
                self._known.clear()
                self._version = version
            key = digest(token) if token else ""
            known = self._known.get(key) if key else None
            if known is not None and time.monotonic() - known[1] < CACHE_MAX_AGE:
                self._known.move_to_end(key)
                return known[0]
        caller, stored_key = await off_loop(self._lookup, token)
        if stored_key and version is not None:
            with self._lock:
                if self._version == version:  # not a revoke since: remember it
                    self._known[key] = (caller, time.monotonic())
                    while len(self._known) > CACHE_SIZE:
                        self._known.popitem(last=False)
        return caller

    def _never_had_keys(self) -> bool:
        """No key was ever created, as last read at most STATE_TTL seconds ago."""
        with self._lock:
            return time.monotonic() - self._read_at < STATE_TTL and self._counts[0] == 0

    async def _current_version(self, r: aioredis.Redis | None) -> str | None:
        """The revocation token in Redis, set when missing (a new or restarted Redis); None
        when Redis cannot be read: then nothing is remembered."""
        if r is None or time.monotonic() < self._redis_back_at:
            return None
        try:
            async with asyncio.timeout(TOKEN_READ_S):
                version = await r.get(keys_version_key())
                if version is None:
                    await r.set(keys_version_key(), uuid.uuid4().hex, nx=True)
                    version = await r.get(keys_version_key())
        except (redis.RedisError, TimeoutError):  # slow or away: not asked again for 1 s
            self._redis_back_at = time.monotonic() + 1.0
            return None
        return None if version is None else str(version)

    def session_for(self, token: str) -> str:
        """The session `token` (the Bearer value, "" for none) acts as, or KeyRefused."""
        return self.caller_for(token).session

    def caller_for(self, token: str) -> Caller:
        """Who `token` (the Bearer value, "" for none) is, or KeyRefused."""
        return self._lookup(token)[0]

    def _lookup(self, token: str) -> tuple[Caller, bool]:
        """Who `token` is, and whether it is a live key of the registry's; or KeyRefused."""
        if token:  # a key is looked up anyway: the counts come fresh with it
            with transaction(self._database_url()) as s:
                row = stored.by_digest(s, digest(token))
                if row is not None and row.revoked_at is None:
                    return Caller(row.session, bool(row.admin)), True
                revoked = row is not None
                created, live = self.counts(s)
        else:
            revoked = False
            created, live = self.counts()
        if self.exposed and not live:
            raise KeyRefused(
                503,
                "this gateway listens beyond loopback and no API key is live (none was "
                "created, or all are revoked), so it refuses every request; "
                f"{CREATE_HINT}, or serve on 127.0.0.1",
                "no_live_key",
            )
        if revoked:
            raise KeyRefused(
                401,
                "this API key was revoked: ask for a new one "
                f"({CREATE_HINT}; `farm keys list` shows which are live)",
                "invalid_api_key",
            )
        if created or self.required:
            why = "missing" if not token else "unknown"
            raise KeyRefused(
                401,
                f"{why} API key: this farm requires one; send Authorization: Bearer KEY "
                f"({CREATE_HINT})",
                "invalid_api_key",
            )
        # A farm that never had keys (a laptop, on loopback): whatever key a tool sends.
        return Caller("default", admin=False), False
