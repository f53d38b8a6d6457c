"""Queries on usage rows, one per job: queued, started, ended, cancelled, expired; recent
jobs and totals per session and model. Every function takes the caller's session; none
commits."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import case, func, select, update
from sqlalchemy.orm import Session

from farm.registry.tables import (
    TERMINAL_STATUSES,
    BatchLineRecord,
    UsageRecord,
    utcnow,
)


def _insert(s: Session) -> Any:
    """The dialect's INSERT, which knows ON CONFLICT (SQLite and PostgreSQL)."""
    name = s.get_bind().dialect.name
    # Imported here, not at the top: importing the PostgreSQL dialect costs every command
    # tens of ms (`farm status` on SQLite never needs it), and reads need neither.
    if name == "postgresql":
        from sqlalchemy.dialects import postgresql

        return postgresql.insert
    from sqlalchemy.dialects import sqlite

    return sqlite.insert


def _insert_ignoring_duplicates(s: Session, values: dict[str, Any]) -> None:
    insert = _insert(s)
    s.execute(
        insert(UsageRecord).values(**values).on_conflict_do_nothing(index_elements=["job_id"])
    )


def record_queued(
    s: Session, *, job_id: str, session: str, model: str, priority: str, submitted_at: datetime
) -> None:
    _insert_ignoring_duplicates(
        s,
        {
            "job_id": job_id,
            "session": session,
            "model": model,
            "priority": priority,
            "status": "queued",
            "submitted_at": submitted_at,
        },
    )


def record_queued_many(s: Session, rows: list[dict[str, Any]]) -> None:
    """record_queued for many jobs in one statement (executemany); rows: job_id, session,
    model, priority, submitted_at."""
    if rows:
        # On the table, not the ORM class: a plain executemany, without the ORM's bulk
        # bookkeeping (this runs for every submitted job).
        s.connection().execute(
            _insert(s)(UsageRecord.__table__).on_conflict_do_nothing(index_elements=["job_id"]),
            [{**row, "status": "queued"} for row in rows],
        )


def record_started(
    s: Session,
    *,
    job_id: str,
    session: str,
    model: str,
    priority: str,
    worker_id: str,
    submitted_at: datetime,
) -> str | None:
    """Mark the job running on `worker_id`, in one statement.

    Returns None when it now runs here, else the status it had already ended with
    (succeeded, failed or cancelled: a redelivery, or a job cancelled while queued).
    One INSERT ... ON CONFLICT DO UPDATE covers a row the client has not written yet (it
    writes just after sending, or another producer sent the job) and a row it has, so a
    concurrent insert can never be misread as a missing or ended job.
    """
    running = {"status": "running", "worker_id": worker_id, "started_at": utcnow()}
    row = {"job_id": job_id, "session": session, "model": model, "priority": priority}
    stmt = (
        _insert(s)(UsageRecord)
        .values(**row, **running, submitted_at=submitted_at)
        .on_conflict_do_update(
            index_elements=["job_id"],
            set_=running,
            where=UsageRecord.status.not_in(TERMINAL_STATUSES),
        )
        .returning(UsageRecord.status)
    )
    if s.execute(stmt).first() is not None:
        return None
    return s.scalar(select(UsageRecord.status).where(UsageRecord.job_id == job_id))


def record_finished(s: Session, *, job_id: str, status: str, **fields: Any) -> bool:
    """Complete the job's usage row once; a second delivery of the same job changes nothing.

    Returns True when this call wrote the row.
    """
    assert status in TERMINAL_STATUSES, status
    fields.setdefault("finished_at", utcnow())
    result = s.execute(
        update(UsageRecord)
        .where(UsageRecord.job_id == job_id, UsageRecord.status.not_in(TERMINAL_STATUSES))
        .values(status=status, **fields)
    )
    return bool(getattr(result, "rowcount", 0))


def record_ended(
    s: Session,
    *,
    job_id: str,
    status: str,
    session: str,
    model: str,
    priority: str,
    submitted_at: datetime,
    **fields: Any,
) -> bool:
    """Like record_finished, but first inserts the row if nobody recorded the job yet (the
    client records it just after sending, so a fast failure on the worker can come first)."""
    record_queued(
        s, job_id=job_id, session=session, model=model, priority=priority, submitted_at=submitted_at
    )
    return record_finished(s, job_id=job_id, status=status, **fields)


def finish_batch_line(
    s: Session,
    *,
    batch_id: str,
    line: int,
    job_id: str,
    status: str,
    result: dict[str, Any] | None,
    error: str | None,
    finished_at: datetime | None = None,
) -> bool:
    """Write a batch line's outcome once: the first of its jobs to end writes it, and a
    second delivery changes nothing. The line may still read pending (the feeder records
    it queued just after sending its job): it is matched by batch and line, not job id."""
    assert status in TERMINAL_STATUSES, status
    written = s.execute(
        update(BatchLineRecord)
        .where(
            BatchLineRecord.batch_id == batch_id,
            BatchLineRecord.line == line,
            BatchLineRecord.status.in_(("pending", "queued")),
        )
        .values(
            status=status,
            job_id=job_id,
            result=result,
            error=error,
            finished_at=finished_at or utcnow(),
        )
    )
    return bool(getattr(written, "rowcount", 0))


def expire_stale_queued(s: Session, *, older_than: datetime, reason: str) -> list[str]:
    """Rows still queued long after any worker would have run or dropped their job: the
    message was lost (a broker that restarted without persistence). End them as expired."""
    rows = s.execute(
        update(UsageRecord)
        .where(UsageRecord.status == "queued", UsageRecord.submitted_at < older_than)
        .values(status="expired", error=reason, finished_at=utcnow())
        .returning(UsageRecord.job_id)
    ).all()
    return [str(r[0]) for r in rows]


def queued_jobs(s: Session) -> dict[str, str]:
    """Every job the registry has queued (not started, not ended): job id -> model."""
    query = select(UsageRecord.job_id, UsageRecord.model).where(UsageRecord.status == "queued")
    return {str(job): str(model) for job, model in s.execute(query)}


def expire_queued(s: Session, *, job_ids: Iterable[str], reason: str) -> list[str]:
    """End these jobs as expired with `reason`, those still queued; returns their ids."""
    ids, expired = list(job_ids), []
    for at in range(0, len(ids), 500):  # SQLite's limit on a statement's variables
        rows = s.execute(
            update(UsageRecord)
            .where(UsageRecord.job_id.in_(ids[at : at + 500]), UsageRecord.status == "queued")
            .values(status="expired", error=reason, finished_at=utcnow())
            .returning(UsageRecord.job_id)
        ).all()
        expired += [str(r[0]) for r in rows]
    return expired


def cancel_if_queued(s: Session, *, job_id: str) -> bool:
    """Mark a job cancelled only if no worker has started it yet (atomic)."""
    result = s.execute(
        update(UsageRecord)
        .where(UsageRecord.job_id == job_id, UsageRecord.status == "queued")
        .values(status="cancelled", finished_at=utcnow())
    )
    return bool(getattr(result, "rowcount", 0))


def get_usage(s: Session, job_id: str) -> UsageRecord | None:
    return s.scalar(select(UsageRecord).where(UsageRecord.job_id == job_id))


def served_since(s: Session, since: datetime) -> dict[str, tuple[int, int, int]]:
    """Per session, the jobs that ended since `since` and used tokens: (jobs, prompt
    tokens, completion tokens), for the fair share's report."""
    query = (
        select(
            UsageRecord.session,
            func.count(),
            func.coalesce(func.sum(UsageRecord.prompt_tokens), 0),
            func.coalesce(func.sum(UsageRecord.completion_tokens), 0),
        )
        .where(UsageRecord.finished_at >= since, UsageRecord.status.in_(("succeeded", "cancelled")))
        .group_by(UsageRecord.session)
    )
    return {str(row[0]): (int(row[1]), int(row[2]), int(row[3])) for row in s.execute(query)}


def recent_generation_ms(s: Session, model: str, most: int) -> list[float]:
    """Generation times (ms) of the model's last `most` succeeded jobs, newest first."""
    return [
        float(ms or 0)
        for ms in s.scalars(
            select(UsageRecord.generation_ms)
            .where(
                UsageRecord.model == model,
                UsageRecord.status == "succeeded",
                UsageRecord.generation_ms.is_not(None),
            )
            .order_by(UsageRecord.finished_at.desc())
            .limit(most)
        )
    ]


def recent_jobs(
    s: Session,
    *,
    session: str | None = None,
    model: str | None = None,
    status: str | None = None,
    since: datetime | None = None,
    batch: str | None = None,
    limit: int | None = 20,
) -> list[UsageRecord]:
    """The newest jobs first, optionally of one session, model, status or batch, or since
    a time."""
    query = select(UsageRecord)
    if batch is not None:
        lines = select(BatchLineRecord.job_id).where(BatchLineRecord.batch_id == batch)
        query = query.where(UsageRecord.job_id.in_(lines))
    if since is not None:
        query = query.where(UsageRecord.submitted_at >= since)
    if session is not None:
        query = query.where(UsageRecord.session == session)
    if model is not None:
        query = query.where(UsageRecord.model == model)
    if status is not None:
        query = query.where(UsageRecord.status == status)
    query = query.order_by(UsageRecord.submitted_at.desc())
    return list(s.scalars(query if limit is None else query.limit(limit)))


@dataclass(frozen=True)
class UsageTotal:
    session: str
    model: str
    jobs: int
    succeeded: int
    failed: int
    cancelled: int
    expired: int
    pending: int  # queued or running: jobs = succeeded + failed + cancelled + expired + pending
    prompt_tokens: int
    completion_tokens: int
    generation_ms: float


def usage_totals(
    s: Session, *, session: str | None = None, batch: str | None = None
) -> list[UsageTotal]:
    """Jobs and tokens per session and model; of one session, or of one batch's lines."""

    def count(*statuses: str) -> Any:
        return func.sum(case((UsageRecord.status.in_(statuses), 1), else_=0))

    query = select(
        UsageRecord.session,
        UsageRecord.model,
        func.count(),
        count("succeeded"),
        count("failed"),
        count("cancelled"),
        count("expired"),
        count("queued", "running"),
        func.coalesce(func.sum(UsageRecord.prompt_tokens), 0),
        func.coalesce(func.sum(UsageRecord.completion_tokens), 0),
        func.coalesce(func.sum(UsageRecord.generation_ms), 0.0),
    ).group_by(UsageRecord.session, UsageRecord.model)
    if session is not None:
        query = query.where(UsageRecord.session == session)
    if batch is not None:
        lines = select(BatchLineRecord.job_id).where(BatchLineRecord.batch_id == batch)
        query = query.where(UsageRecord.job_id.in_(lines))
    rows = s.execute(query.order_by(UsageRecord.session, UsageRecord.model)).all()
    return [
        UsageTotal(
            r[0],
            r[1],
            jobs=int(r[2]),
            succeeded=int(r[3] or 0),
            failed=int(r[4] or 0),
            cancelled=int(r[5] or 0),
            expired=int(r[6] or 0),
            pending=int(r[7] or 0),
            prompt_tokens=int(r[8]),
            completion_tokens=int(r[9]),
            generation_ms=float(r[10]),
        )
        for r in rows
    ]


# -- for the metrics ---------------------------------------------------------------------------


def job_counts(s: Session) -> list[tuple[str, str, str, int]]:
    """(model, priority, status, jobs) for every combination that has jobs."""
    U = UsageRecord
    query = select(U.model, U.priority, U.status, func.count()).group_by(
        U.model, U.priority, U.status
    )
    return [(m, p, st, int(n)) for m, p, st, n in s.execute(query)]


def token_totals(s: Session) -> list[tuple[str, int, int, int]]:
    """(model, prompt tokens, of them cached, tokens generated), all time."""
    U = UsageRecord
    query = select(
        U.model,
        func.sum(U.prompt_tokens),
        func.sum(U.cached_tokens),
        func.sum(U.completion_tokens),
    ).group_by(U.model)
    return [(m, int(p or 0), int(c or 0), int(g or 0)) for m, p, c, g in s.execute(query)]


def histogram(
    s: Session, measure: str, bounds_ms: list[float]
) -> list[tuple[str, list[int], int, float]]:
    """Per model: how many jobs' `measure` (queue_wait, ttft, tpot: generation time per
    output token, generation) is at most each bound in ms, how many have one, and its sum
    in ms: a cumulative histogram as Prometheus takes it."""
    U = UsageRecord
    column = {
        "queue_wait": U.queue_wait_ms,
        "ttft": U.ttft_ms,
        "tpot": U.generation_ms / func.nullif(U.completion_tokens, 0),
        "generation": U.generation_ms,
    }[measure]
    query = select(
        U.model,
        *(func.sum(case((column <= bound, 1), else_=0)) for bound in bounds_ms),
        func.count(column),
        func.coalesce(func.sum(column), 0.0),
    ).group_by(U.model)
    return [
        (row[0], [int(c or 0) for c in row[1:-2]], int(row[-2] or 0), float(row[-1] or 0))
        for row in s.execute(query)
    ]
