"""What the farm looks like now, as `farm status` shows it: models, workers, leases, queue
depths and batches in progress, and one job's state and place (`farm status JOB`)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import redis

from farm.batches.store import active
from farm.context import FarmContext, get_context
from farm.depth import queue_depths, queue_place
from farm.errors import FarmUnavailable, UnknownJob
from farm.fair.share import session_shares
from farm.queue import cancel_key, progress_key
from farm.registry import queries, transaction
from farm.registry.tables import as_utc
from farm.stream import stream_outcome


def fleet_status(ctx: FarmContext | None = None) -> dict[str, Any]:
    ctx = ctx or get_context()
    now = datetime.now(UTC)
    with transaction(ctx.database_url) as s:
        models = queries.list_models(s)
        leases = queries.live_leases(s)
        workers = queries.list_workers(s)
        running = queries.running_jobs(s)
        model_rows: list[dict[str, Any]] = [
            {
                "name": m.name,
                "enabled": m.enabled,
                "workers": sorted(
                    lease.worker_id for lease in leases if lease.model == m.name and lease.loaded
                ),
                "on_demand": sorted(
                    lease.worker_id
                    for lease in leases
                    if lease.model == m.name and not lease.loaded
                ),
            }
            for m in models
        ]
        live_ids = {lease.worker_id for lease in leases}
        worker_rows = []
        for w in workers:
            age = (now - as_utc(w.heartbeat_at)).total_seconds()
            # Stopped workers, and workers lost over an hour ago, are history, not the fleet.
            if w.state == "stopped" or age >= 3600:
                continue
            mine = [lease for lease in leases if lease.worker_id == w.id]
            worker_rows.append(
                {
                    "id": w.id,
                    "host": w.host,
                    "device": w.device,
                    "state": _shown_state(w.state, w.id in live_ids, age > ctx.settings.lease_ttl),
                    "pid": w.pid,
                    "jobs": running.get(w.id, []),
                    "slots_busy": len(running.get(w.id, [])),
                    "slots": w.slots,
                    "threads": w.threads,
                    "tokens_per_s": w.tokens_per_s,
                    "uptime_s": round((now - as_utc(w.started_at)).total_seconds()),
                    "heartbeat_age_s": round(age, 1),
                    "models": sorted(lease.model for lease in mine if lease.loaded),
                    "on_demand": sorted(lease.model for lease in mine if not lease.loaded),
                    "pinned": sorted(lease.model for lease in mine if lease.pinned),
                }
            )
        batch_rows = [
            {
                "id": b.id,
                "name": b.name,
                "status": b.status,
                "priority": b.priority,
                "total": b.total,
                "succeeded": b.succeeded,
                "failed": b.failed,
                "queued": b.counts.get("queued", 0),
                "pending": b.counts.get("pending", 0),
                "eta_s": b.eta_s(),
            }
            for b in active(s)
        ]
    depths = queue_depths(ctx, [m["name"] for m in model_rows])
    for row in model_rows:
        row["queued"] = depths[row["name"]]
    sessions = session_shares(ctx, [m["name"] for m in model_rows])
    return {"models": model_rows, "workers": worker_rows, "batches": batch_rows,
            "sessions": sessions}  # fmt: skip


def tokens_so_far(ctx: FarmContext, job_ids: list[str]) -> list[int]:
    """Completion tokens running jobs have generated so far, from the progress keys their
    workers refresh (the registry counts them only when a job ends); one round trip."""
    pipe = ctx.redis.pipeline(transaction=False)
    for job_id in job_ids:
        pipe.get(progress_key(job_id))
    return [int(n or 0) for n in pipe.execute()]


def job_status(job_id: str, ctx: FarmContext | None = None) -> dict[str, Any]:
    """One job as `farm status JOB --json` prints it: times in ISO 8601 (UTC); token counts
    (none while queued; while running completion_tokens so far and no prompt_tokens yet);
    while queued its position, the jobs ahead per priority and starts_in_s. Keys without a
    value are left out."""
    ctx = ctx or get_context()
    ctx.flush_rows()
    with transaction(ctx.database_url) as s:
        row = queries.get_usage(s, job_id)
        if row is None:
            raise UnknownJob(
                f"no job with id '{job_id}'; check the id (`farm submit --no-wait` prints one)"
            )
        info: dict[str, Any] = {
            "job": row.job_id,
            "status": row.status,
            "model": row.model,
            "priority": row.priority,
            "session": row.session,
            "worker": row.worker_id,
            "submitted": as_utc(row.submitted_at).isoformat(),
            "started": as_utc(row.started_at).isoformat() if row.started_at else None,
            "finished": as_utc(row.finished_at).isoformat() if row.finished_at else None,
            "duration_s": (
                round((row.finished_at - row.started_at).total_seconds(), 3)
                if row.started_at and row.finished_at
                else None
            ),
            "prompt_tokens": row.prompt_tokens,
            "completion_tokens": row.completion_tokens,
            "cached_tokens": row.cached_tokens or None,
            "finish_reason": row.finish_reason,
            "error": row.error,
        }
    if info["status"] == "queued":
        info["prompt_tokens"] = info["completion_tokens"] = None  # none counted yet
    if info["status"] == "running":
        info["prompt_tokens"] = info["prompt_tokens"] or None  # counted when the job ends
    if info["status"] in ("queued", "running"):
        try:
            _live_state(ctx, job_id, info)
        except (FarmUnavailable, redis.RedisError):
            # No farm to ask (`farm up` stopped, Redis down): the registry's view is the answer.
            info["note"] = NO_FARM_NOTE
    return {k: v for k, v in info.items() if v is not None}


NO_FARM_NOTE = "no running farm answers (`farm up` starts one): this is the registry's view"


def _live_state(ctx: FarmContext, job_id: str, info: dict[str, Any]) -> None:
    """What Redis knows of a job the registry still calls queued or running: that it ended
    (its stream's final event), that a cancel was asked for (the worker stops it at its next
    poll), its place in the queue, or the tokens generated so far."""
    info["status"] = stream_outcome(ctx.redis, job_id) or info["status"]
    if info["status"] in ("queued", "running") and ctx.redis.exists(cancel_key(job_id)):
        info["status"] = "cancelled"
    if info["status"] == "queued":
        place = queue_place(ctx, info["model"], job_id)
        if place is not None:
            info.update(place)
    if info["status"] == "running":
        [info["completion_tokens"]] = tokens_so_far(ctx, [job_id])


def _shown_state(state: str, has_live_lease: bool, heartbeat_stale: bool) -> str:
    # A serving worker whose leases expired is lost, even before a worker reaps it; so is
    # one that stopped beating while it was still loading its models.
    if state in ("ready", "busy") and not has_live_lease:
        return "lost"
    if state == "starting" and heartbeat_stale:
        return "lost"
    return state
