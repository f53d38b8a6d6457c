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

An admin key (`farm keys create --admin`) may also read the farm's status (/farm/status:
what `farm status` shows). Nothing else may, a farm that never had keys included: a
loopback gateway may be reached through a proxy or a tunnel, and its operator has `farm
status` on the machine itself.
"""

from __future__ import annotations

import hashlib
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from farm.registry import transaction
from farm.registry.queries import keys as stored

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

KEY_PREFIX = "farm-"
CREATE_HINT = "`farm keys create --session NAME` makes one"
STATE_TTL = 1.0  # seconds the gateway trusts its count of keys: one cheap read a second


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def create(s: Session, session: str, *, admin: bool = False) -> str:
    """A new key for `session`; the only time its text exists outside the caller."""
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    stored.add(s, prefix=key[:12], digest=digest(key), session=session, admin=admin)
    return key


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

    def session_for(self, token: str) -> str:
        """The session `token` (the Bearer value, "" for none) acts as, or KeyRefused."""
        return self.caller_for(token).session

    def caller_for(self, token: str) -> Caller:
        """Who `token` (the Bearer value, "" for none) is, or KeyRefused."""
        if token:  # a key is looked up anyway: the counts come fresh with it
            with transaction(self._database_url()) as s:
                row = stored.by_digest(s, digest(token))
                if row is not None and row.revoked_at is None:
                    return Caller(row.session, bool(row.admin))
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
        return Caller("default", admin=False)
