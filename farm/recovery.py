"""Lost workers and their jobs: a worker whose leases expired is lost, and the jobs it held
(its usage rows marked running) go back to the front of their queues at once instead of
after Redis's visibility timeout, and their rows say queued again.

Every worker runs `reap_lost_workers` on each heartbeat; the registry hands each lost
worker to exactly one of them. Workers only: lease expiry is judged by the reaper's clock,
and a laptop running `farm status` with a skewed clock must not requeue running jobs.
The claim is committed before the broker is touched, so a job is never restored twice by a
claim that later rolls back; if the requeue fails, the claim is undone and the next heartbeat
tries again.
"""

from __future__ import annotations

import logging
from datetime import timedelta

from farm.admission import quotas
from farm.broker import requeue_unacked
from farm.context import FarmContext
from farm.registry import queries, transaction
from farm.registry.tables import utcnow
from farm.stream import free_runs

log = logging.getLogger(__name__)


def reap_lost_workers(ctx: FarmContext) -> list[tuple[str, list[str], set[str]]]:
    """Mark lost workers and requeue their jobs. Returns (worker, jobs, requeued) each."""
    with transaction(ctx.database_url) as s:
        lost = queries.claim_lost_workers(s)
    reaped = []
    for worker_id, jobs in lost:
        try:
            requeued = requeue_unacked(ctx.app, jobs)
        except Exception:
            log.exception("could not requeue jobs %s of lost worker %s; retrying", jobs, worker_id)
            with transaction(ctx.database_url) as s:
                queries.unclaim_lost_worker(s, worker_id=worker_id)
            continue
        mark_queued(ctx, worker_id, requeued)
        reaped.append((worker_id, jobs, requeued))
        for job_id in jobs:
            log.warning(
                "worker %s is lost; its job %s %s",
                worker_id,
                job_id,
                "is queued again" if job_id in requeued else "was not held by the broker any more",
            )
        if not jobs:
            log.warning("worker %s is lost (it held no job)", worker_id)
    return reaped


def release_worker(ctx: FarmContext, worker_id: str) -> set[str]:
    """A worker known to be gone (its supervisor saw it exit): mark it lost and put the jobs
    it held back at the front of their queues now, without waiting for its lease."""
    with transaction(ctx.database_url) as s:
        jobs = queries.mark_worker_lost(s, worker_id=worker_id)
    try:  # before the requeue: the next delivery need not wait for the dead run's key
        free_runs(ctx.redis, worker_id, jobs)
    except Exception as e:  # the keys expire on their own within FARM_LEASE_TTL
        log.warning("could not free the run keys of %s: %s", worker_id, e)
    requeued = requeue_unacked(ctx.app, jobs)
    mark_queued(ctx, worker_id, requeued)
    for job_id in sorted(requeued):
        log.warning("worker %s is gone; its job %s is queued again", worker_id, job_id)
    return requeued


def mark_queued(ctx: FarmContext, worker_id: str, requeued: set[str]) -> None:
    """Their messages are back in the queues: their rows say queued again (not running on
    a worker that is gone) until a worker starts them. Should this write fail, the rows
    are right again as soon as a worker starts the jobs."""
    try:
        with transaction(ctx.database_url) as s:
            queries.requeued(s, worker_id=worker_id, job_ids=requeued)
    except Exception as e:
        log.warning("could not mark the requeued jobs of %s queued: %s", worker_id, e)


def expire_orphaned_rows(ctx: FarmContext) -> list[str]:
    """Usage rows of jobs the broker lost: still 'queued' well past FARM_JOB_EXPIRES, when
    a worker would have run the job or dropped it as expired. They end as expired, with
    the reason, so that usage matches what the client saw."""
    settings = ctx.settings
    cutoff = utcnow() - timedelta(seconds=settings.job_expires + settings.lease_ttl + 60)
    reason = (
        f"never started within FARM_JOB_EXPIRES ({settings.job_expires}s): its message was "
        "lost (a broker restarted without persistence?) or dropped; it was not run"
    )
    with transaction(ctx.database_url) as s:
        expired = queries.expire_stale_queued(s, older_than=cutoff, reason=reason)
    for job_id in expired:
        log.warning("job %s was lost before it ran; its usage row now says expired", job_id)
        quotas.settle(ctx, job_id, 0)
    return expired
