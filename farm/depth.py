"""How full a model's queue is and where a queued job stands in it, read from the broker's
own lists (kombu keeps one Redis list per model and priority step; Flower's metrics have no
queue length) and the jobs held for their fair turn beside them (farm/fair/), with an
estimate of when a queued job starts."""

from __future__ import annotations

import json
from typing import Any

from farm.context import FarmContext
from farm.fair.place import dispatch_order, held_counts, held_step
from farm.queue import PRIORITIES, PRIORITY_STEPS, fair_jobs_key, priority_list_key, priority_name
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
        for step, n in held_counts(ctx.broker_redis, model).items():
            per[priority_name(step)] += n
        depths[model] = per
    return depths


def queued(ctx: FarmContext, model: str) -> int:
    """Jobs waiting for a model, all priorities together: in its queue (one round trip)
    and held for their fair turn (one for the count of the jobs hash)."""
    pipe = ctx.broker_redis.pipeline(transaction=False)
    for step in PRIORITY_STEPS:
        pipe.llen(priority_list_key(model, step))
    pipe.hlen(fair_jobs_key(model))
    return sum(int(n) for n in pipe.execute())


def queue_position(ctx: FarmContext, model: str, job_id: str) -> int | None:
    """1 when the job is next to run; None when it is not waiting in its queue."""
    place = queue_place(ctx, model, job_id)
    return None if place is None else place["position"]


def queue_place(ctx: FarmContext, model: str, job_id: str) -> dict[str, Any] | None:
    """Where a queued job stands: its position (1 = next), the jobs ahead of it per named
    priority, and an estimate of when it starts; None when it is not waiting.

    Ahead of it: every job of a higher priority (in the queue or held), and of its own:
    the queue's, then the held jobs its fair turn comes after."""
    r = ctx.broker_redis
    held = held_counts(r, model)
    step = held_step(r, model, job_id)
    ahead = dict.fromkeys(PRIORITIES, 0)
    if step is not None:
        for s in PRIORITY_STEPS:
            if s <= step:
                ahead[priority_name(s)] += int(r.llen(priority_list_key(model, s)))
            if s < step:
                ahead[priority_name(s)] += held[s]
        order = dispatch_order(r, model, step)
        if job_id not in order:  # dispatched meanwhile: look again in the queue
            return queue_place(ctx, model, job_id) if held_step(r, model, job_id) is None else None
        ahead[priority_name(step)] += order.index(job_id)
        return _place(ctx, model, ahead)
    for s in PRIORITY_STEPS:
        # kombu pushes on the left and pops on the right: the right end runs first.
        messages = r.lrange(priority_list_key(model, s), 0, -1)
        for i, raw in enumerate(reversed(messages)):
            try:
                found = json.loads(raw)["headers"]["id"] == job_id
            except (ValueError, KeyError, TypeError):
                continue
            if found:
                ahead[priority_name(s)] += i
                return _place(ctx, model, ahead)
        ahead[priority_name(s)] += len(messages) + held[s]
    return None


def _place(ctx: FarmContext, model: str, ahead: dict[str, int]) -> dict[str, Any]:
    total = sum(ahead.values())
    return {"position": total + 1, "ahead": ahead, "starts_in_s": _eta(ctx, model, total)}


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
