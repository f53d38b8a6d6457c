"""The batch feeder: keeps each model's queue topped up with a bounded number of batch lines.

A 100,000-line batch is not 100,000 messages in Redis. Each pass, for every model with
pending lines, the feeder queues just enough to keep FARM_BATCH_WINDOW of that model's
lines queued or running, shared evenly between the batches waiting on it, at their
batches' priority (low by default): an interactive job still goes ahead of every line
not yet started, and Redis holds at most the window.

    pending --(queued by the feeder, with a job id)--> queued --(worker)--> succeeded/failed
       ^                                                  |
       +--- its job expired unrun (a broker that lost it) +   cancelled / expired (the batch)

A line's job id is derived from (batch, line, attempt), and the feeder records a line
queued only after its job is sent: after a crash in between, the line is queued again
under the same id, which a worker runs once (the usage row is keyed on it) and whose
outcome is written on the line once (queries.finish_batch_line). Runs wherever the farm
runs (`farm up`, `farm serve`, `farm batch feeder`); a Redis lock keeps one pass at a time
across all of them, and everything it needs is in the registry, so a farm stopped
mid-batch resumes where it was.
"""

from __future__ import annotations

import logging
import math
import threading
import time
import uuid
from datetime import datetime
from typing import TYPE_CHECKING

from farm.admission import quotas
from farm.batches import feed_queries, store
from farm.batches.store import ACTIVE
from farm.context import FarmContext, get_context
from farm.enqueue import submit_many
from farm.errors import FarmError, InvalidRequest, UnknownModel
from farm.queue import BATCH_FEEDER_LOCK, batch_cancelled_key
from farm.registry import queries, transaction
from farm.registry.tables import BatchLineRecord, BatchRecord, utcnow
from farm.request import Request
from farm.results import Job

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

log = logging.getLogger(__name__)

LOCK_TTL_MS = 15_000
_NAMESPACE = uuid.UUID("5c6b1f5e-9a53-4a53-8f1b-6a7d0f1c2b3a")


def line_job_id(batch_id: str, line: int, attempt: int) -> str:
    """The same job id for the same attempt at a line, whoever queues it."""
    return str(uuid.uuid5(_NAMESPACE, f"{batch_id}:{line}:{attempt}"))


class Feeder:
    def __init__(self, ctx: FarmContext | None = None, *, window: int | None = None):
        self.ctx = ctx or get_context()
        self.window = window or self.ctx.settings.batch_window
        self._token = uuid.uuid4().hex
        self._waiting: dict[str, float] = {}  # model -> when "cannot queue" was last logged
        self._models: dict[str, set[str]] = {}  # batch -> the models its lines name

    # -- the loop ----------------------------------------------------------------------------
    def run(self, stop: threading.Event, *, interval: float = 0.25, idle: float = 1.0) -> None:
        """Feed until `stop` is set: a pass whenever this feeder holds the lock."""
        try:
            while not stop.is_set():
                busy = False
                try:
                    if self._lock():
                        self.step()
                        busy = bool(self._models)  # batches in progress: pass again soon
                except Exception as e:  # the registry or Redis away: the next pass retries
                    log.warning("batch feeder: %s: %s; retrying", type(e).__name__, e)
                    stop.wait(2.0)
                stop.wait(interval if busy else idle)
        finally:
            self._unlock()

    def _lock(self) -> bool:
        r = self.ctx.redis
        if r.set(BATCH_FEEDER_LOCK, self._token, nx=True, px=LOCK_TTL_MS):
            return True
        # Ours already: renew it (atomic compare-and-extend).
        return bool(
            r.eval(
                "if redis.call('get', KEYS[1]) == ARGV[1] then "
                "return redis.call('pexpire', KEYS[1], ARGV[2]) else return 0 end",
                1,
                BATCH_FEEDER_LOCK,
                self._token,
                LOCK_TTL_MS,
            )
        )

    def _unlock(self) -> None:
        try:
            self.ctx.redis.eval(
                "if redis.call('get', KEYS[1]) == ARGV[1] then "
                "return redis.call('del', KEYS[1]) else return 0 end",
                1,
                BATCH_FEEDER_LOCK,
                self._token,
            )
        except Exception as e:  # it expires on its own
            log.debug("batch feeder lock not released: %s", e)

    # -- one pass ------------------------------------------------------------------------------
    def step(self) -> int:
        """One pass over the active batches; returns how many lines it queued."""
        db = self.ctx.database_url
        with transaction(db) as s:
            active = feed_queries.active_batches(s)
        self._models = {b: m for b, m in self._models.items() if b in {a[0] for a in active}}
        if not active:
            return 0
        now = utcnow()
        open_ids = [b for b, status, expires in active if status == "in_progress" and now < expires]
        for batch_id, status, expires in active:
            if status == "cancelling":
                self._cancel_queued(batch_id)
            elif now >= expires:
                self._expire_pending(batch_id)
        self._reconcile(set(open_ids))
        # The lock again before sending: a pass that ran long (a slow registry) must not
        # send lines another feeder has taken over meanwhile.
        queued = self._feed(open_ids) if open_ids and self._lock() else 0
        self._finish([b for b, _, _ in active])
        return queued

    def _feed(self, batch_ids: list[str]) -> int:
        with transaction(self.ctx.database_url) as s:
            inflight = feed_queries.queued_per_model(s)
            for batch_id in batch_ids:  # read once per batch: a batch's lines never change
                if batch_id not in self._models:
                    self._models[batch_id] = feed_queries.line_models(s, batch_id)
        per_model: dict[str, list[str]] = {}
        for batch_id in batch_ids:
            for model in self._models[batch_id]:
                per_model.setdefault(model, []).append(batch_id)
        queued = 0
        for model, batches in sorted(per_model.items()):
            inside = inflight.get(model, 0)
            room = self.window - inside
            # Top up in chunks of a quarter window (fewer, larger publishes), or at once
            # when the queue runs low.
            if room >= max(1, self.window // 4) or inside < max(1, self.window // 8):
                queued += self._feed_model(model, sorted(batches), room)
        return queued

    def _feed_model(self, model: str, batch_ids: list[str], room: int) -> int:
        """Queue up to `room` lines of `model`, shared evenly between the batches."""
        share = math.ceil(room / len(batch_ids))
        picked: list[tuple[BatchLineRecord, BatchRecord]] = []
        with transaction(self.ctx.database_url) as s:
            for batch_id in batch_ids:
                batch = feed_queries.get_batch(s, batch_id)
                if batch is None:
                    continue
                allowed = self._session_room(s, batch.session, share)
                if allowed <= 0:
                    continue
                most = min(allowed, room - len(picked))
                for line in feed_queries.next_pending(s, batch_id, model, most):
                    picked.append((line, batch))
        if not picked:
            return 0
        requests: list[Request | dict[str, object]] = []
        for line, batch in picked:
            requests.append(
                {
                    **line.request,
                    "session": batch.session,
                    "priority": batch.priority,
                    "stream_tokens": False,
                    "batch": {"id": batch.id, "line": line.line},
                }
            )
        ids = [line_job_id(b.id, line.line, line.attempts + 1) for line, b in picked]
        results = submit_many(requests, ctx=self.ctx, job_ids=ids, rate=False)  # a level of its own
        queued, failed, held = [], [], None
        for (line, batch), job_id, result in zip(picked, ids, results, strict=True):
            if not isinstance(result, FarmError):
                queued.append((line.id, job_id, line.attempts + 1, batch, line.request["model"]))
            elif isinstance(result, InvalidRequest | UnknownModel):
                failed.append((line.id, str(result)))  # it can never run: the line fails
            else:
                held = result  # no worker, queue full, quota, broker: stays pending
        now = utcnow()
        cancelled: list[str] = []
        with transaction(self.ctx.database_url) as s:
            # The jobs' usage rows with the lines, not behind them: a line queued always has
            # its row, so a job whose message the broker loses is expired (recovery.py) and
            # the line queued again, never left waiting for good.
            queries.record_queued_many(
                s,
                [
                    {"job_id": job_id, "session": batch.session, "model": model,
                     "priority": batch.priority, "submitted_at": now}
                    for _, job_id, _, batch, model in queued
                ],
            )  # fmt: skip
            for line_id, job_id, attempt, _, _ in queued:
                # Cancelled while its job was being sent: that job must not run.
                if feed_queries.mark_queued(s, line_id, job_id, attempt) == "cancelled":
                    cancelled.append(job_id)
            for line_id, reason in failed:
                feed_queries.fail_pending(s, line_id, reason, now)
        for job_id in cancelled:
            self._cancel_job(job_id)
        if held is not None:
            last = self._waiting.get(model, 0.0)
            if time.monotonic() - last > 60:
                self._waiting[model] = time.monotonic()
                log.warning("batch lines for '%s' wait: %s", model, held)
        return len(queued)

    def _reconcile(self, open_ids: set[str]) -> None:
        """Queued lines whose job ended without writing on the line: expired unrun (its
        message was lost, or it waited past FARM_JOB_EXPIRES) goes back to pending while
        its batch is open; cancelled or failed by someone else is copied onto the line."""
        with transaction(self.ctx.database_url) as s:
            now = utcnow()
            for line_id, batch_id, status, error in feed_queries.queued_with_ended_jobs(s):
                values: dict[str, object]
                if status == "expired" and batch_id in open_ids:
                    values = {"status": "pending", "job_id": None}
                elif status == "succeeded":  # written by a worker from before batches
                    values = {"status": "failed", "error": "its result was not recorded"}
                else:
                    values = {"status": status, "error": error, "finished_at": now}
                feed_queries.update_queued(s, line_id, **values)

    def _cancel_queued(self, batch_id: str) -> None:
        """A cancelling batch: cancel the jobs of its queued lines (a queued job never
        runs, a running one stops at its next token; _reconcile records them)."""
        with transaction(self.ctx.database_url) as s:
            jobs = feed_queries.queued_jobs(s, batch_id)
        key = batch_cancelled_key(batch_id)
        for job_id in jobs:
            # Once per job: a running job's cancel is a flag it reads at its next token.
            if self.ctx.redis.sadd(key, job_id) and not self._cancel_job(job_id):
                self.ctx.redis.srem(key, job_id)  # the next pass tries again
        self.ctx.redis.expire(key, 86400)

    def _cancel_job(self, job_id: str) -> bool:
        try:
            Job(job_id, ctx=self.ctx).cancel()
            return True
        except FarmError as e:
            log.warning("could not cancel batch job %s: %s", job_id, e)
            return False

    def _session_room(self, s: Session, session: str, share: int) -> int:
        """Lines of `session` the feeder may add: with a max_queued quota, its batches
        take at most half of it, leaving the rest to the session's interactive jobs."""
        limit = quotas.limits(self.ctx, session, s)  # in this transaction: no second connection
        if limit is None or limit.max_queued is None:
            return share
        return min(share, limit.max_queued // 2 - feed_queries.queued_of_session(s, session))

    def _expire_pending(self, batch_id: str) -> None:
        """The batch's window ended: lines not queued yet never run; queued ones finish."""
        with transaction(self.ctx.database_url) as s:
            feed_queries.expire_pending(s, batch_id, utcnow())

    def _finish(self, batch_ids: list[str]) -> None:
        """Batches with no line pending or queued end: completed, cancelled or expired."""
        with transaction(self.ctx.database_url) as s:
            now = utcnow()
            for batch_id in batch_ids:
                if feed_queries.has_unfinished(s, batch_id):
                    continue
                c = store.counts(s, [batch_id])[batch_id]
                batch = feed_queries.get_batch(s, batch_id)
                if batch is None or batch.status not in ACTIVE:
                    continue
                ending = _ending(batch, c, now)
                feed_queries.end_batch(s, batch_id, batch.status, ending)
                log.info("batch %s %s: %s", batch_id, ending["status"], c)


def _ending(batch: BatchRecord, lines: dict[str, int], now: datetime) -> dict[str, object]:
    if batch.status == "cancelling":
        return {"status": "cancelled", "cancelled_at": now}
    if lines.get("expired", 0):
        return {"status": "expired", "expired_at": now}
    return {"status": "completed", "finalizing_at": now, "completed_at": now}


def start_feeder(ctx: FarmContext | None = None) -> tuple[threading.Thread, threading.Event]:
    """The feeder in a daemon thread of this process; set the event to stop it."""
    stop = threading.Event()
    feeder = Feeder(ctx)
    thread = threading.Thread(
        target=feeder.run, args=(stop,), name="farm-batch-feeder", daemon=True
    )
    thread.start()
    return thread, stop
