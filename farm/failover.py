"""A broker that lost writes: Redis Sentinel promoted a replica, or a Redis restarted.

Redis replicates asynchronously: a write the master acknowledged may not have reached the
replica Sentinel promotes when the master fails. For farm that is a job whose message was
queued (its client was told so, and its usage row says queued) and is gone, a job's
dequeue or acknowledgement (the job is then delivered once more: the registry and the run
key see that it ran or runs, and it is not counted twice), or the last events of a stream.
A Redis restarted without persistence loses everything it held the same way.

The registry does not lose writes, so it reconciles the broker's loss. Each worker's
heartbeat asks the broker's Redis for its replication id (INFO's `master_replid`: a new
one at every promotion and every restart) beside the id recorded under BROKER_EPOCH_KEY,
one round trip. When they differ, the worker that takes BROKER_RECONCILE_LOCK:

  1. reads the jobs the registry has queued, and looks for their messages in the broker
     (`broker.jobs_in_broker`: priority lists, fair-share holds, unacknowledged) and for
     their run keys (farm/stream.py: a run took the job and its row does not say so yet);
  2. on a later beat, a moment later, looks again for those it did not find (a message
     is between two places for a moment when a worker takes it or one is restored, and a
     worker that took one while the broker was down claims its run key once it is back);
  3. ends those still missing, and still queued, as `expired` with a reason that names
     the failover, settles their quota reservations, and records the new id.

A usage row says queued only once the broker accepted the job's message (farm/enqueue.py),
so a queued job whose message is missing twice was lost, not on its way. Jobs that were
running go on: their workers reconnect to the new master through the sentinels, and a
run whose dequeue was lost meets its own run key (farm/stream.py) on the second delivery.
`recovery.expire_orphaned_rows` stays the backstop when no replication id can be read.
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import redis

from farm.admission import quotas
from farm.broker import jobs_in_broker
from farm.context import FarmContext
from farm.queue import BROKER_EPOCH_KEY, BROKER_RECONCILE_LOCK, run_key
from farm.registry import queries, transaction

log = logging.getLogger(__name__)

LOCK_TTL_S = 120  # a reconciling worker that died holds the lock no longer than this
# The second look comes on a later beat, at least this much later: more than a worker's
# retries (workers/stream.py `patiently`, at most 1 s apart) take to claim a run key once
# the broker answers again.
RECHECK_AFTER_S = 2.0

# Lua: delete the lock KEYS[1] if ARGV[1] still holds it.
_UNLOCK = """
if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end
return 0
"""


@dataclass
class _Pending:
    """A reconciliation under way: the broker's new id and the jobs not found at first."""

    epoch: str
    before: str | None
    token: str
    missing: dict[str, str]  # job id -> model
    recheck_at: float = field(default_factory=lambda: time.monotonic() + RECHECK_AFTER_S)


class BrokerWatch:
    """One worker's watch on the broker's replication id; `step()` once per heartbeat."""

    def __init__(self, ctx: FarmContext):
        self.ctx = ctx
        self.pending: _Pending | None = None
        self.disabled = False  # a Redis that does not tell its replication id

    def step(self) -> list[str]:
        """Check the broker's id, reconcile when it changed; returns the jobs expired."""
        if self.disabled:
            return []
        if self.pending is None:
            self._begin()
            return []
        if time.monotonic() < self.pending.recheck_at:
            return []
        pending, self.pending = self.pending, None
        return self._finish(pending)

    def _begin(self) -> None:
        r = self.ctx.broker_redis
        pipe = r.pipeline(transaction=False)
        pipe.info("replication")
        pipe.get(BROKER_EPOCH_KEY)
        try:
            info, before = pipe.execute()
        except redis.ResponseError:  # INFO refused (an ACL, a managed Redis)
            info, before = None, None
        epoch = info.get("master_replid") if isinstance(info, dict) else None
        if not epoch:
            self.disabled = True
            log.warning(
                "the broker's Redis tells no replication id (INFO replication): jobs it "
                "loses are expired only after FARM_JOB_EXPIRES"
            )
            return
        if epoch == before:
            return
        token = uuid.uuid4().hex
        if not r.set(BROKER_RECONCILE_LOCK, token, nx=True, ex=LOCK_TTL_S):
            return  # another worker reconciles this change
        pending = _Pending(str(epoch), before, token, {})
        try:
            with transaction(self.ctx.database_url) as s:
                queued = queries.queued_jobs(s)
            pending.missing = _missing(self.ctx, queued)
        except BaseException:
            self._unlock(pending)
            raise
        log.log(
            logging.WARNING if pending.missing else logging.INFO,
            "the broker's Redis changed (replication id %s -> %s: a failover or a restart); "
            "of %d queued jobs, %d not found in it",
            _short(before),
            _short(epoch),
            len(queued),
            len(pending.missing),
        )
        if pending.missing:
            self.pending = pending  # looked for again on a later beat
        else:
            self._finish(pending)

    def _finish(self, pending: _Pending) -> list[str]:
        expired: list[str] = []
        try:
            with transaction(self.ctx.database_url) as s:
                still_queued = set(queries.queued_jobs(s))
            lost = _missing(
                self.ctx, {j: m for j, m in pending.missing.items() if j in still_queued}
            )
            with transaction(self.ctx.database_url) as s:
                expired = queries.expire_queued(s, job_ids=sorted(lost), reason=_reason(pending))
            for job_id in expired:
                log.warning("job %s was lost by the broker's failover; it now says expired", job_id)
                quotas.settle(self.ctx, job_id, 0)
            self.ctx.broker_redis.set(BROKER_EPOCH_KEY, pending.epoch)
        finally:
            self._unlock(pending)
        return expired

    def _unlock(self, pending: _Pending) -> None:
        r: Any = self.ctx.broker_redis
        r.eval(_UNLOCK, 1, BROKER_RECONCILE_LOCK, pending.token)


def _missing(ctx: FarmContext, jobs: dict[str, str]) -> dict[str, str]:
    """Those of `jobs` (id -> model) whose message the broker does not hold and that no run
    has taken. A worker may hold a message the broker lost (taken before the failover, its
    `unacked` entry lost with it): its run key, in the results Redis, says a run has it."""
    if not jobs:
        return {}
    present = jobs_in_broker(ctx.app, sorted(set(jobs.values())))
    missing = {job: model for job, model in jobs.items() if job not in present}
    if not missing:
        return {}
    pipe = ctx.redis.pipeline(transaction=False)
    for job in missing:
        pipe.exists(run_key(job))
    taken = pipe.execute()
    return {job: model for (job, model), run in zip(missing.items(), taken, strict=True) if not run}


def _reason(pending: _Pending) -> str:
    return (
        "lost in a broker failover: its message was queued on a Redis master that then "
        f"failed or restarted (replication id {_short(pending.before)} -> "
        f"{_short(pending.epoch)}) before the write reached the Redis that took over "
        "(Redis replicates asynchronously); it was not run: submit it again"
    )


def _short(epoch: str | None) -> str:
    return epoch[:8] if epoch else "unknown"
