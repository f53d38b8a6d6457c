"""How full a model's queue is and where a queued job stands in it, read from the broker's
own lists (kombu keeps one Redis list per model and priority step; Flower's metrics have no
queue length), with an estimate of when a queued job starts."""

from __future__ import annotations

import json
from typing import Any

from farm.context import FarmContext
from farm.queue import PRIORITIES, PRIORITY_STEPS, priority_list_key, priority_name
from farm.registry import queries, transaction


def queue_depths(ctx: FarmContext, models: list[str]) -> dict[str, dict[str, int]]:
    """Queued jobs per model, per named priority."""
    pipe = ctx.broker_redis.pipeline(transaction=False)
    for model in models:
        for step in PRIORITY_STEPS:
            pipe.llen(priority_list_key(model, step))
    lengths = iter(pipe.execute())
    depths: dict[str, dict[str, int]] = {}
    for model in models:
        per = dict.fromkeys(PRIORITIES, 0)
        for step in PRIORITY_STEPS:
            per[priority_name(step)] += int(next(lengths))
        depths[model] = per
    return depths


def queued(ctx: FarmContext, model: str) -> int:
    """Jobs waiting in a model's queue, all priorities together (one round trip)."""
    pipe = ctx.broker_redis.pipeline(transaction=False)
    for step in PRIORITY_STEPS:
        pipe.llen(priority_list_key(model, step))
    return sum(int(n) for n in pipe.execute())


def queue_position(ctx: FarmContext, model: str, job_id: str) -> int | None:
    """1 when the job is next to run; None when it is not waiting in its queue."""
    place = queue_place(ctx, model, job_id)
    return None if place is None else place["position"]


def queue_place(ctx: FarmContext, model: str, job_id: str) -> dict[str, Any] | None:
    """Where a queued job stands: its position (1 = next), the jobs ahead of it per named
    priority, and an estimate of when it starts; None when it is not in its queue."""
    ahead = dict.fromkeys(PRIORITIES, 0)
    for step in PRIORITY_STEPS:
        # kombu pushes on the left and pops on the right: the right end runs first.
        messages = ctx.broker_redis.lrange(priority_list_key(model, step), 0, -1)
        for i, raw in enumerate(reversed(messages)):
            try:
                found = json.loads(raw)["headers"]["id"] == job_id
            except (ValueError, KeyError, TypeError):
                continue
            if found:
                ahead[priority_name(step)] += i
                total = sum(ahead.values())
                return {
                    "position": total + 1,
                    "ahead": ahead,
                    "starts_in_s": _eta(ctx, model, total),
                }
        ahead[priority_name(step)] += len(messages)
    return None


ETA_WINDOW = 50  # recent jobs of the model whose durations the estimate uses


def _eta(ctx: FarmContext, model: str, ahead: int) -> float | None:
    """Seconds until a job with `ahead` jobs before it starts: those jobs, plus the ones
    running, served at the pace of the model's recent jobs by its live workers' slots.
    None while the model has no recent job to learn from."""
    with transaction(ctx.database_url) as s:
        recent = queries.recent_generation_ms(s, model, ETA_WINDOW)
        leases = queries.live_leases(s, model)
        workers = {w.id: w for w in queries.list_workers(s)}
        running = queries.running_jobs(s)
    if not recent or not leases:
        return None
    slots = max(1, sum(workers[x.worker_id].slots for x in leases if x.worker_id in workers))
    free = max(0, slots - sum(len(running.get(x.worker_id, [])) for x in leases))
    if ahead < free:
        return 0.0
    per_job = sorted(recent)[len(recent) // 2] / 1000  # the median recent job, in seconds
    # Every slot busy: the running jobs end about half a job from now on average, then the
    # jobs ahead drain `slots` at a time.
    return round(per_job / 2 + (ahead - free) / slots * per_job, 1)
