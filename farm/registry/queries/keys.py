"""API keys in the registry: named queries on the `api_keys` table. Each takes the caller's
session and none commits. The key's text never reaches here, only its digest."""

from __future__ import annotations

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from farm.registry.tables import ApiKeyRecord, utcnow


def add(s: Session, *, prefix: str, digest: str, session: str, admin: bool = False) -> ApiKeyRecord:
    """Record a new key by its first characters and digest, mapped to `session`."""
    record = ApiKeyRecord(prefix=prefix, digest=digest, session=session, admin=admin)
    s.add(record)
    return record


def by_digest(s: Session, digest: str) -> ApiKeyRecord | None:
    """The key with this digest, live or revoked; None for a key never created."""
    return s.scalar(select(ApiKeyRecord).where(ApiKeyRecord.digest == digest))


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


def with_prefix(s: Session, prefix: str) -> int:
    """How many keys, live or revoked, start with `prefix`."""
    query = select(func.count(ApiKeyRecord.id)).where(ApiKeyRecord.prefix == prefix[:12])
    return int(s.scalar(query) or 0)


def listing(s: Session) -> list[ApiKeyRecord]:
    """Every key, live or revoked, oldest first."""
    return list(s.scalars(select(ApiKeyRecord).order_by(ApiKeyRecord.created_at)))


def counts(s: Session) -> tuple[int, int]:
    """(keys ever created, keys live now): one read of the table."""
    total, revoked = s.execute(
        select(func.count(ApiKeyRecord.id), func.count(ApiKeyRecord.revoked_at))
    ).one()
    return int(total), int(total) - int(revoked)
