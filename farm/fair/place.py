"""Where held jobs stand: how many each priority step and session holds, and the order the
least-served rule will dispatch them in (for a job's position, its ETA, status, metrics)."""

from __future__ import annotations

import heapq
from typing import Any

from farm.queue import PRIORITY_STEPS, fair_held_key, fair_jobs_key, fair_level_key


def held_per_session(r: Any, model: str) -> dict[int, dict[str, int]]:
    """Held jobs of a model: step -> session -> how many (two round trips)."""
    pipe = r.pipeline(transaction=False)
    for step in PRIORITY_STEPS:
        pipe.zrange(fair_level_key(model, step, "backlog"), 0, -1)
    backlogs = dict(zip(PRIORITY_STEPS, pipe.execute(), strict=True))
    pipe = r.pipeline(transaction=False)
    for step, sessions in backlogs.items():
        for session in sessions:
            pipe.llen(fair_held_key(model, step, session))
    lengths = iter(pipe.execute())
    return {
        step: {session: int(next(lengths)) for session in sessions}
        for step, sessions in backlogs.items()
    }


def held_counts(r: Any, model: str) -> dict[int, int]:
    """Held jobs of a model per priority step."""
    return {step: sum(per.values()) for step, per in held_per_session(r, model).items()}


def held_step(r: Any, model: str, job_id: str) -> int | None:
    """The priority step a job is held at; None when it is not held."""
    meta = r.hget(fair_jobs_key(model), job_id)
    return None if meta is None else int(meta.split("\t")[1])


def dispatch_order(r: Any, model: str, step: int) -> list[str]:
    """The step's held jobs in the order they will be dispatched if nothing else arrives:
    the dispatch script's own rule (least served session first, ties by name, each charged
    its estimate), played forward."""
    backlog = r.zrange(fair_level_key(model, step, "backlog"), 0, -1, withscores=True)
    pipe = r.pipeline(transaction=False)
    for session, _ in backlog:
        pipe.lrange(fair_held_key(model, step, session), 0, -1)
    lists = pipe.execute()
    ids = [job for jobs in lists for job in jobs]
    metas = r.hmget(fair_jobs_key(model), ids) if ids else []
    charge = {job: float(m.split("\t")[2]) if m else 0.0 for job, m in zip(ids, metas, strict=True)}
    heap = [
        (float(score), session, 0)
        for (session, score), jobs in zip(backlog, lists, strict=True)
        if jobs
    ]
    heapq.heapify(heap)
    jobs_of = {session: jobs for (session, _), jobs in zip(backlog, lists, strict=True)}
    order: list[str] = []
    while heap:
        score, session, i = heapq.heappop(heap)
        job = jobs_of[session][i]
        order.append(job)
        if i + 1 < len(jobs_of[session]):
            heapq.heappush(heap, (score + charge[job], session, i + 1))
    return order
