"""Lost workers and their jobs: a worker whose leases expired is lost, and the job it held
goes back to the front of its queue at once instead of after Redis's visibility timeout.

Every worker runs `reap_lost_workers` on each heartbeat; the registry hands each lost
worker to exactly one of them. Workers only: lease expiry is judged by the reaper's clock,
and a laptop running `farm status` with a skewed clock must not requeue running jobs.
The requeue happens inside the claiming transaction: if Redis cannot be reached, the claim
rolls back and the next heartbeat tries again.
"""

from __future__ import annotations

import logging

from farm.context import FarmContext
from farm.queue import requeue_unacked
from farm.registry import queries, transaction

log = logging.getLogger(__name__)


def reap_lost_workers(ctx: FarmContext) -> list[tuple[str, str | None, bool]]:
    """Mark lost workers and requeue their jobs. Returns (worker, job, requeued) each."""
    reaped = []
    with transaction(ctx.database_url) as s:
        for worker_id, job_id in queries.claim_lost_workers(s):
            requeued = bool(job_id) and requeue_unacked(ctx.app, str(job_id))
            reaped.append((worker_id, job_id, requeued))
    for worker_id, job_id, requeued in reaped:
        if job_id:
            log.warning(
                "worker %s is lost; its job %s %s",
                worker_id,
                job_id,
                "is queued again" if requeued else "was not held by the broker any more",
            )
        else:
            log.warning("worker %s is lost (it held no job)", worker_id)
    return reaped
