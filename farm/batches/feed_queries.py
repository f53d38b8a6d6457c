"""The feeder's reads and writes on batches and their lines: which batches are open, how
many lines each model has queued, the next pending lines, and each line's move from pending
to queued to its end. Like `store.py`, every function takes the caller's session and none
commits."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from farm.batches.store import ACTIVE
from farm.registry.tables import (
    TERMINAL_STATUSES,
    BatchLineRecord,
    BatchRecord,
    UsageRecord,
    as_utc,
)


def active_batches(s: Session) -> list[tuple[str, str, datetime]]:
    """(id, status, expires_at in UTC) of every batch in progress or cancelling."""
    query = select(BatchRecord).where(BatchRecord.status.in_(ACTIVE))
    return [(b.id, b.status, as_utc(b.expires_at)) for b in s.scalars(query)]


def get_batch(s: Session, batch_id: str) -> BatchRecord | None:
    """The batch's row, detached from the session (safe to read after it ends)."""
    batch = s.get(BatchRecord, batch_id)
    if batch is not None:
        s.expunge(batch)
    return batch


def queued_per_model(s: Session) -> dict[str, int]:
    """Lines queued (sent to the broker, not ended) per model, over every batch."""
    query = (
        select(BatchLineRecord.model, func.count())
        .where(BatchLineRecord.status == "queued")
        .group_by(BatchLineRecord.model)
    )
    return {model: int(n) for model, n in s.execute(query)}


def line_models(s: Session, batch_id: str) -> set[str]:
    """The models a batch's lines name."""
    query = select(BatchLineRecord.model).where(BatchLineRecord.batch_id == batch_id).distinct()
    return set(s.scalars(query))


def queued_of_session(s: Session, session: str) -> int:
    """Lines queued by the batches of one session."""
    query = (
        select(func.count())
        .select_from(BatchLineRecord)
        .join(BatchRecord, BatchRecord.id == BatchLineRecord.batch_id)
        .where(BatchLineRecord.status == "queued", BatchRecord.session == session)
    )
    return int(s.scalar(query) or 0)


def next_pending(s: Session, batch_id: str, model: str, most: int) -> list[BatchLineRecord]:
    """Up to `most` pending lines of a batch for one model, in file order, detached."""
    lines = s.scalars(
        select(BatchLineRecord)
        .where(
            BatchLineRecord.batch_id == batch_id,
            BatchLineRecord.model == model,
            BatchLineRecord.status == "pending",
        )
        .order_by(BatchLineRecord.line)
        .limit(most)
    ).all()
    for line in lines:
        s.expunge(line)
    return list(lines)


def mark_queued(s: Session, line_id: int, job_id: str, attempt: int) -> str:
    """A pending line's job was sent: the line is queued under it. Returns the line's status
    after: `queued`, or what it became meanwhile (`cancelled`: that job must not run)."""
    written = s.execute(
        update(BatchLineRecord)
        .where(BatchLineRecord.id == line_id, BatchLineRecord.status == "pending")
        .values(status="queued", job_id=job_id, attempts=attempt)
    )
    if getattr(written, "rowcount", 1):
        return "queued"
    return str(s.scalar(select(BatchLineRecord.status).where(BatchLineRecord.id == line_id)))


def fail_pending(s: Session, line_id: int, reason: str, now: datetime) -> None:
    """A pending line that can never run (its request is refused) fails with the reason."""
    s.execute(
        update(BatchLineRecord)
        .where(BatchLineRecord.id == line_id, BatchLineRecord.status == "pending")
        .values(status="failed", error=reason, finished_at=now)
    )


def queued_with_ended_jobs(s: Session) -> list[tuple[int, str, str, str | None]]:
    """(line id, batch id, job status, job error) of queued lines whose job has ended."""
    query = (
        select(BatchLineRecord.id, BatchLineRecord.batch_id, UsageRecord.status,
               UsageRecord.error)
        .join(UsageRecord, UsageRecord.job_id == BatchLineRecord.job_id)
        .where(BatchLineRecord.status == "queued",
               UsageRecord.status.in_(TERMINAL_STATUSES))
    )  # fmt: skip
    return [(int(i), b, st, e) for i, b, st, e in s.execute(query)]


def update_queued(s: Session, line_id: int, **values: object) -> None:
    """Change a line that is still queued (a line that moved on meanwhile is left alone)."""
    s.execute(
        update(BatchLineRecord)
        .where(BatchLineRecord.id == line_id, BatchLineRecord.status == "queued")
        .values(**values)
    )


def queued_jobs(s: Session, batch_id: str) -> list[str]:
    """The job ids of a batch's queued lines."""
    query = select(BatchLineRecord.job_id).where(
        BatchLineRecord.batch_id == batch_id, BatchLineRecord.status == "queued"
    )
    return [job_id for job_id in s.scalars(query) if job_id]


def expire_pending(s: Session, batch_id: str, now: datetime) -> None:
    """The batch's window ended: its lines not queued yet never run."""
    s.execute(
        update(BatchLineRecord)
        .where(BatchLineRecord.batch_id == batch_id, BatchLineRecord.status == "pending")
        .values(
            status="expired",
            error="the batch's completion window ended before this line ran",
            finished_at=now,
        )
    )


def has_unfinished(s: Session, batch_id: str) -> bool:
    """Whether any line of the batch is pending or queued (an index seek, not a count)."""
    found = s.scalar(
        select(BatchLineRecord.id)
        .where(
            BatchLineRecord.batch_id == batch_id,
            BatchLineRecord.status.in_(("pending", "queued")),
        )
        .limit(1)
    )
    return found is not None


def end_batch(s: Session, batch_id: str, was: str, values: dict[str, object]) -> None:
    """The batch ends (completed, cancelled or expired) unless its status moved from `was`."""
    s.execute(
        update(BatchRecord)
        .where(BatchRecord.id == batch_id, BatchRecord.status == was)
        .values(**values)
    )
