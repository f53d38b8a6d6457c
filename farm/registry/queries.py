"""Reads and writes on the registry. Every function takes the caller's session; none commits."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import case, delete, func, select, update
from sqlalchemy.orm import Session

from farm.errors import ModelExists, UnknownModel
from farm.registry.tables import (
    TERMINAL_STATUSES,
    BatchLineRecord,
    LeaseRecord,
    ModelRecord,
    UsageRecord,
    WorkerRecord,
    utcnow,
)

# -- models ---------------------------------------------------------------------------------


def add_model(
    s: Session,
    *,
    name: str,
    path: str,
    n_ctx: int = 4096,
    n_gpu_layers: int = -1,
    chat_format: str | None = None,
    defaults: dict[str, Any] | None = None,
) -> ModelRecord:
    if s.scalar(select(ModelRecord).where(ModelRecord.name == name)) is not None:
        raise ModelExists(
            f"a model named '{name}' is already registered; remove it first with "
            f"`farm models remove {name}` or pick another name"
        )
    record = ModelRecord(
        name=name,
        path=path,
        n_ctx=n_ctx,
        n_gpu_layers=n_gpu_layers,
        chat_format=chat_format,
        defaults=defaults or {},
        enabled=True,
    )
    s.add(record)
    s.flush()
    return record


def list_models(s: Session) -> list[ModelRecord]:
    return list(s.scalars(select(ModelRecord).order_by(ModelRecord.name)))


def get_model(s: Session, name: str) -> ModelRecord:
    """The enabled model called `name`, or UnknownModel listing the known ones."""
    record = s.scalar(select(ModelRecord).where(ModelRecord.name == name))
    if record is None or not record.enabled:
        known = ", ".join(m.name for m in list_models(s) if m.enabled) or "none yet"
        raise UnknownModel(
            f"unknown model '{name}'; known: {known}; add one with `farm models add NAME PATH.gguf`"
        )
    return record


def remove_model(s: Session, name: str) -> None:
    record = get_model(s, name)
    s.delete(record)


# -- workers and leases ----------------------------------------------------------------------


def register_worker(
    s: Session,
    *,
    worker_id: str,
    host: str,
    pid: int,
    device: str,
    versions: dict[str, Any],
    slots: int = 1,
    threads: int = 1,
) -> WorkerRecord:
    """Record a worker (again, if a previous process used the same id: its leases go)."""
    s.execute(delete(LeaseRecord).where(LeaseRecord.worker_id == worker_id))
    worker = s.get(WorkerRecord, worker_id)
    if worker is None:
        worker = WorkerRecord(id=worker_id)
        s.add(worker)
    now = utcnow()
    worker.host, worker.pid, worker.device, worker.versions = host, pid, device, versions
    worker.slots, worker.threads, worker.tokens_per_s = slots, threads, None
    worker.state, worker.started_at, worker.heartbeat_at = "starting", now, now
    s.flush()
    return worker


@dataclass(frozen=True)
class LeaseSpec:
    model: str
    loaded: bool = True
    pinned: bool = False
    size_bytes: int = 0


def set_leases(
    s: Session, *, worker_id: str, device: str, leases: list[LeaseSpec], ttl: float
) -> None:
    """The worker serves exactly these models now (loaded or on demand); mark it ready."""
    now = utcnow()
    s.execute(delete(LeaseRecord).where(LeaseRecord.worker_id == worker_id))
    for lease in leases:
        s.add(
            LeaseRecord(
                worker_id=worker_id,
                model=lease.model,
                device=device,
                loaded=lease.loaded,
                pinned=lease.pinned,
                size_bytes=lease.size_bytes,
                acquired_at=now,
                expires_at=now + timedelta(seconds=ttl),
            )
        )
    s.execute(
        update(WorkerRecord)
        .where(WorkerRecord.id == worker_id, WorkerRecord.state.in_(("starting", "lost")))
        .values(state="ready")
    )


def heartbeat(s: Session, *, worker_id: str, ttl: float, tokens_per_s: float | None = None) -> int:
    """Renew the worker's leases; returns how many it holds."""
    now = utcnow()
    s.execute(
        update(WorkerRecord)
        .where(WorkerRecord.id == worker_id)
        .values(heartbeat_at=now, tokens_per_s=tokens_per_s)
    )
    result = s.execute(
        update(LeaseRecord)
        .where(LeaseRecord.worker_id == worker_id)
        .values(expires_at=now + timedelta(seconds=ttl))
    )
    return int(getattr(result, "rowcount", 0) or 0)


def running_jobs(s: Session, worker_id: str | None = None) -> dict[str, list[str]]:
    """The jobs each worker (or one) is running now: its usage rows marked running."""
    query = select(UsageRecord.worker_id, UsageRecord.job_id).where(UsageRecord.status == "running")
    if worker_id is not None:
        query = query.where(UsageRecord.worker_id == worker_id)
    jobs: dict[str, list[str]] = {}
    for worker, job in s.execute(query.order_by(UsageRecord.started_at)):
        jobs.setdefault(str(worker), []).append(str(job))
    return jobs


def release_worker(s: Session, *, worker_id: str) -> None:
    """The worker stopped: drop its leases and mark it stopped."""
    s.execute(delete(LeaseRecord).where(LeaseRecord.worker_id == worker_id))
    s.execute(
        update(WorkerRecord)
        .where(WorkerRecord.id == worker_id)
        .values(state="stopped", tokens_per_s=None)
    )


def live_leases(s: Session, model: str | None = None) -> list[LeaseRecord]:
    query = select(LeaseRecord).where(LeaseRecord.expires_at > utcnow())
    if model is not None:
        query = query.where(LeaseRecord.model == model)
    return list(s.scalars(query.order_by(LeaseRecord.model, LeaseRecord.worker_id)))


def list_workers(s: Session) -> list[WorkerRecord]:
    return list(s.scalars(select(WorkerRecord).order_by(WorkerRecord.id)))


def unclaim_lost_worker(s: Session, *, worker_id: str) -> None:
    """Undo a claim whose requeue failed: the next reaper claims the worker again."""
    s.execute(
        update(WorkerRecord)
        .where(WorkerRecord.id == worker_id, WorkerRecord.state == "lost")
        .values(state="ready")
    )


def mark_worker_lost(s: Session, *, worker_id: str) -> list[str]:
    """The worker is gone: drop its leases, mark it lost, return the jobs it was running."""
    s.execute(delete(LeaseRecord).where(LeaseRecord.worker_id == worker_id))
    s.execute(
        update(WorkerRecord)
        .where(WorkerRecord.id == worker_id, WorkerRecord.state.in_(("starting", "ready", "busy")))
        .values(state="lost")
    )
    return running_jobs(s, worker_id).get(worker_id, [])


def requeued(s: Session, *, worker_id: str, job_ids: Iterable[str]) -> None:
    """Jobs of a gone worker that are back in their queues: queued again, with no worker,
    unless another worker has already started one of them meanwhile."""
    ids = list(job_ids)
    if ids:
        s.execute(
            update(UsageRecord)
            .where(
                UsageRecord.job_id.in_(ids),
                UsageRecord.status == "running",
                UsageRecord.worker_id == worker_id,
            )
            .values(status="queued", worker_id=None, started_at=None)
        )


def claim_lost_workers(s: Session) -> list[tuple[str, list[str]]]:
    """Mark workers whose leases all expired as lost, and return (worker, jobs it held).

    Each lost worker is returned to exactly one caller (UPDATE ... RETURNING), so only one
    process requeues its jobs.
    """
    live = select(LeaseRecord.worker_id).where(LeaseRecord.expires_at > utcnow())
    rows = s.execute(
        update(WorkerRecord)
        .where(WorkerRecord.state.in_(("ready", "busy")), WorkerRecord.id.not_in(live))
        .values(state="lost")
        .returning(WorkerRecord.id)
    ).all()
    lost = [str(r[0]) for r in rows]
    if lost:
        s.execute(delete(LeaseRecord).where(LeaseRecord.worker_id.in_(lost)))
    return [(w, running_jobs(s, w).get(w, [])) for w in lost]


# -- usage ------------------------------------------------------------------------------------


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
