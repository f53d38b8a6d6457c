"""Lost workers and their jobs: a worker whose leases expired is lost, and the job it held
goes back to the front of its queue at once instead of after Redis's visibility timeout.

Every worker runs `reap_lost_workers` on each heartbeat, and `farm status` runs it too; the
registry hands each lost worker to exactly one of them.
"""

from __future__ import annotations

import logging

from farm.context import FarmContext
from farm.queue import requeue_unacked
from farm.registry import queries, transaction

log = logging.getLogger(__name__)


def reap_lost_workers(ctx: FarmContext) -> list[tuple[str, str | None, bool]]:
    """Mark lost workers and requeue their jobs. Returns (worker, job, requeued) each."""
    with transaction(ctx.database_url) as s:
        lost = queries.claim_lost_workers(s)
    reaped = []
    for worker_id, job_id in lost:
        requeued = bool(job_id) and requeue_unacked(ctx.app, str(job_id))
        if job_id:
            log.warning(
                "worker %s is lost; its job %s %s",
                worker_id,
                job_id,
                "is queued again" if requeued else "was not held by the broker any more",
            )
        else:
            log.warning("worker %s is lost (it held no job)", worker_id)
        reaped.append((worker_id, job_id, requeued))
    return reaped
