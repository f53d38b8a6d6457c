"""API keys: created once and shown once, kept as SHA-256 digests, each mapped to a session."""

from __future__ import annotations

import hashlib
import secrets

from sqlalchemy import select
from sqlalchemy.orm import Session

from farm.registry.tables import ApiKeyRecord, utcnow

KEY_PREFIX = "farm-"


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def create(s: Session, session: str) -> str:
    """A new key for `session`; the only time its text exists outside the caller."""
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    s.add(ApiKeyRecord(prefix=key[:12], digest=digest(key), session=session))
    return key


def session_of(s: Session, key: str) -> str | None:
    """The session a live key maps to; None for an unknown or revoked key."""
    row = s.scalar(select(ApiKeyRecord).where(ApiKeyRecord.digest == digest(key)))
    return None if row is None or row.revoked_at is not None else row.session


def any_keys(s: Session) -> bool:
    return (
        s.scalar(select(ApiKeyRecord.id).where(ApiKeyRecord.revoked_at.is_(None)).limit(1))
        is not None
    )


def revoke(s: Session, prefix: str) -> int:
    """Revoke the live keys starting with `prefix`; returns how many."""
    rows = s.scalars(
        select(ApiKeyRecord).where(
            ApiKeyRecord.prefix == prefix[:12], ApiKeyRecord.revoked_at.is_(None)
        )
    ).all()
    for row in rows:
        row.revoked_at = utcnow()
    return len(rows)


def listing(s: Session) -> list[ApiKeyRecord]:
    return list(s.scalars(select(ApiKeyRecord).order_by(ApiKeyRecord.created_at)))
