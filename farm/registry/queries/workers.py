"""Queries on workers and their leases: registration, heartbeats, which jobs run where, and
workers found lost. Every function takes the caller's session; none commits."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session

from farm.registry.tables import (
    ACTIVE_WORKER_STATES,
    LeaseRecord,
    UsageRecord,
    WorkerRecord,
    utcnow,
)


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


def get_worker(s: Session, worker_id: str) -> WorkerRecord | None:
    return s.get(WorkerRecord, worker_id)


def device_users(
    s: Session, *, host: str, device: str, beating_since: datetime, other_than: str
) -> list[WorkerRecord]:
    """Other workers on `host` registered on `device`, active and beating since then."""
    query = select(WorkerRecord).where(
        WorkerRecord.host == host,
        WorkerRecord.device == device,
        WorkerRecord.id != other_than,
        WorkerRecord.state.in_(ACTIVE_WORKER_STATES),
        WorkerRecord.heartbeat_at > beating_since,
    )
    return list(s.scalars(query))


def set_worker_device(s: Session, *, worker_id: str, device: str) -> None:
    """The device a worker ended up on once its models loaded (cpu, or a GPU's index)."""
    worker = s.get(WorkerRecord, worker_id)
    if worker is not None:
        worker.device = device


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
