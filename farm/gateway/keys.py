"""API keys: created once and shown once, kept as SHA-256 digests, each mapped to a session.
The registry's queries on them are in farm/registry/keys.py."""

from __future__ import annotations

import hashlib
import secrets

from sqlalchemy.orm import Session

from farm.registry import keys as stored

KEY_PREFIX = "farm-"


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def create(s: Session, session: str) -> str:
    """A new key for `session`; the only time its text exists outside the caller."""
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    stored.add(s, prefix=key[:12], digest=digest(key), session=session)
    return key


def session_of(s: Session, key: str) -> str | None:
    """The session a live key maps to; None for an unknown or revoked key."""
    row = stored.by_digest(s, digest(key))
    return None if row is None or row.revoked_at is not None else row.session


def any_keys(s: Session) -> bool:
    return stored.any_live(s)
