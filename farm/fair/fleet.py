"""Fair share on the fleet's side: each model's cap from its live slots, dispatching when a
worker takes a job and on its heartbeat, and a job's charge settled when it ends.

Workers call these; none of them is needed for a job to move (the submit that holds a job
dispatches too), and every one is safe to call from any number of processes at once."""

from __future__ import annotations

import logging
import math

from farm.context import FarmContext
from farm.fair import held
from farm.queue import priority_number
from farm.registry import queries, transaction
from farm.request import Request

log = logging.getLogger(__name__)


def live_slots(ctx: FarmContext, model: str) -> int:
    """Slots of the live workers holding a lease on the model (0: none is live)."""
    with transaction(ctx.database_url) as s:
        leases = queries.live_leases(s, model)
        workers = {w.id: w for w in queries.list_workers(s)}
    return sum(workers[x.worker_id].slots for x in leases if x.worker_id in workers)


def refresh(ctx: FarmContext, models: list[str]) -> int:
    """Write each model's cap (FARM_FAIR_QUEUED, or a quarter of its live slots, at least
    one) and dispatch up to it; returns how many jobs were dispatched. A worker's heartbeat
    and its join call it.

    Why a quarter (bench/fairness.py, bench/README.md): a job that arrives behind a flood
    waits for the cap's jobs to start, so the cap is the grain of fairness. With the cap at
    the live slots a late session waited 1.4-1.5 job durations on the twin and 2.2 on Gemma
    (4 slots); with one job, 0.44 and 1.2, and the slots stayed as busy (each take
    dispatches the next job at once). A few kept ready on a wide worker spare a wave of
    sequences ending together from waiting on one dispatch after another."""
    r = ctx.broker_redis
    moved = 0
    for model in models:
        slots = live_slots(ctx, model)
        if slots:  # with no live worker the cap stays: jobs wait held, as they would queued
            held.set_cap(r, model, ctx.settings.fair_queued or math.ceil(slots / 4))
        moved += held.dispatch(r, model)
    return moved


def on_take(ctx: FarmContext, model: str) -> None:
    """A worker took a job of `model` off its queue: a place opened, fill it. Never fails
    the job: the heartbeat dispatches again."""
    try:
        held.dispatch(ctx.broker_redis, model)
    except Exception as e:
        log.warning("could not dispatch held jobs of %s: %s", model, e)


def settle(
    ctx: FarmContext, job_id: str, request: Request, prompt_tokens: int, completion_tokens: int
) -> None:
    """Correct the job's charge to what it used (once; a redelivery settles nothing)."""
    step = priority_number(request.priority, batch=request.batch is not None)
    real = held.cost(prompt_tokens, completion_tokens, ctx.settings.fair_output_weight)
    try:
        held.settle(ctx.broker_redis, request.model, step, request.session, job_id, real)
    except Exception as e:  # the counter keeps its estimate: fairness a little off, no harm
        log.warning("could not settle the fair-share charge of job %s: %s", job_id, e)
