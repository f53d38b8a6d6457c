"""Queries on quotas: a session's limits on tokens per day, jobs in flight and requests and
tokens per minute (the counts
against them live in Redis, `farm/admission/quotas.py`). Every function takes the caller's
session; none commits."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from farm.registry.tables import QuotaRecord, utcnow


def get_quota(s: Session, session: str) -> QuotaRecord | None:
    return s.get(QuotaRecord, session)


def set_quota(
    s: Session,
    session: str,
    *,
    tokens_per_day: int | None,
    max_queued: int | None,
    requests_per_minute: int | None = None,
    tokens_per_minute: int | None = None,
    weight: float | None = None,
) -> None:
    """Create or change a session's limits; a None leaves that limit as it was, a 0 for
    a per-minute one removes it."""
    row = s.get(QuotaRecord, session) or QuotaRecord(session=session)
    if tokens_per_day is not None:
        row.tokens_per_day = tokens_per_day
    if max_queued is not None:
        row.max_queued = max_queued
    if requests_per_minute is not None:
        row.requests_per_minute = requests_per_minute or None
    if tokens_per_minute is not None:
        row.tokens_per_minute = tokens_per_minute or None
    if weight is not None:
        row.weight = weight
    row.updated_at = utcnow()
    s.add(row)


def list_quotas(s: Session) -> list[QuotaRecord]:
    return list(s.scalars(select(QuotaRecord).order_by(QuotaRecord.session)))


def remove_quota(s: Session, session: str) -> bool:
    """False when the session had no quota."""
    row = s.get(QuotaRecord, session)
    if row is None:
        return False
    s.delete(row)
    return True
