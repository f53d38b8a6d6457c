"""A job's exactly-once bookkeeping: usage row, redeliveries, spool on a registry outage.

Its usage row is started and ended once, a redelivered job is never run twice, and the
writes are kept in the spool while the registry is down.

    admit:  mark the row running (waiting out a registry outage, then back to the queue)
            -> cancelled while queued?            CANCELLED: the job ends unrun
            -> an earlier delivery finished it?   its Completion, the row completed
            -> it already ended otherwise?        ENDED: not run again
    end:    settle the quota, complete the row once (idempotent on the job id), or spool it

A job can be delivered more than once (acks_late, a worker that died, a visibility
timeout), so every write here is idempotent on the job's id.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar

from celery.exceptions import Reject

from farm.admission import quotas
from farm.completion import Completion
from farm.context import FarmContext
from farm.errors import FarmUnavailable
from farm.registry import queries, transaction
from farm.request import BatchLine, Request
from farm.stream import CANCELLED, DONE, FAILED, last_event
from workers.spool import UsageSpool
from workers.stream import publish_event

log = logging.getLogger(__name__)
T = TypeVar("T")

REGISTRY_CALL_S = 20.0  # a registry call that has not answered by then counts as an outage


@dataclass(frozen=True)
class Admission:
    """What `Bookkeeper.admit` found: run the job, or how it already ended."""

    run: bool = True
    cancelled: bool = False  # cancelled while queued: it ends revoked, unrun
    result: dict[str, Any] | None = None  # an earlier delivery's Completion: the job's result


RUN = Admission()
CANCELLED_UNRUN = Admission(run=False, cancelled=True)
ENDED = Admission(run=False)


class Bookkeeper:
    """The registry and stream writes that make a job's outcome count once."""

    def __init__(self, ctx: FarmContext, worker_id: str, spool: UsageSpool):
        self.ctx = ctx
        self.worker_id = worker_id
        self.spool = spool

    def publish(self, job_id: str, kind: str, **fields: Any) -> None:
        publish_event(self.ctx.redis, job_id, kind, **fields)

    def admit(
        self, job_id: str, request: Request, submitted: float, redelivered: bool
    ) -> Admission:
        """Mark the job running; say whether it may run (RUN) or how it already ended."""
        ttl = self.ctx.settings.stream_ttl
        ended = self._record_started(job_id, request, submitted)
        if ended == "cancelled":
            log.info("job %s was cancelled while queued; skipped", job_id)
            self.publish(job_id, CANCELLED, ttl=ttl)
            return CANCELLED_UNRUN
        if ended is None and not redelivered:
            return RUN
        previous = self._previous_completion(job_id)
        if previous is not None:
            # A delivery before this one finished the job (and may have died before its
            # acknowledgement, or even before its usage write): do not generate twice.
            log.warning("job %s was delivered again after it ended; not run twice", job_id)
            result = previous.model_dump(mode="json")
            self.end(
                job_id, "succeeded", batch=request.batch, result=result, **usage_fields(previous)
            )
            return Admission(run=False, result=result)
        if ended is not None:
            # It ended (failed, expired or succeeded) and its usage is written: a recorded
            # outcome is never followed by another run of the same job.
            log.warning("job %s was delivered again after it %s; not run again", job_id, ended)
            if ended in ("failed", "expired"):
                self.publish(job_id, FAILED, ttl=ttl, error=self._error_of(job_id))
            return ENDED
        return RUN

    def _record_started(self, job_id: str, request: Request, submitted: float) -> str | None:
        """Mark the job running. While the registry is unreachable, wait and retry, holding
        the job (unacknowledged, so a crash meanwhile puts it back): the registry is never
        the reason a job fails. After `registry_wait` seconds the job goes back to its queue.
        """
        delay, deadline = 0.25, time.monotonic() + self.ctx.settings.registry_wait
        while True:

            def mark() -> str | None:
                with transaction(self.ctx.database_url) as s:
                    return queries.record_started(
                        s,
                        job_id=job_id,
                        session=request.session,
                        model=request.model,
                        priority=request.priority,
                        worker_id=self.worker_id,
                        submitted_at=datetime.fromtimestamp(submitted, UTC),
                    )

            try:
                return bounded(mark, REGISTRY_CALL_S)
            except FarmUnavailable as e:
                if time.monotonic() >= deadline:
                    log.error("registry still unreachable; job %s goes back to its queue", job_id)
                    raise Reject(str(e), requeue=True) from e
                log.warning(
                    "registry unreachable at the start of job %s; retrying in %.1fs", job_id, delay
                )
                time.sleep(delay)
                delay = min(delay * 2, 5.0)

    def _error_of(self, job_id: str) -> str:
        with transaction(self.ctx.database_url) as s:
            row = queries.get_usage(s, job_id)
            return (row.error if row is not None else None) or "no reason recorded"

    def _previous_completion(self, job_id: str) -> Completion | None:
        """The Completion an earlier delivery of this job already produced, if still kept."""
        event = last_event(self.ctx.redis, job_id)
        if event is None or event[0] != DONE:
            return None
        return Completion.model_validate_json(event[1]["completion"])

    def end(
        self,
        job_id: str,
        status: str,
        request: Request | None = None,
        *,
        batch: BatchLine | None = None,
        result: dict[str, Any] | None = None,
        **fields: Any,
    ) -> None:
        """Complete the usage row (once); kept in the spool while the registry is down.

        With the request, the row is first inserted if nobody recorded the job yet (the
        client records it just after sending, so a fast failure here can come first).
        With `batch`, the job is a batch line: its outcome (`result`, the Completion, or
        the error) is written on the line, in the same transaction."""
        try:
            used = int(fields.get("prompt_tokens") or 0) + int(fields.get("completion_tokens") or 0)
            quotas.settle(self.ctx, job_id, used)  # once, whichever delivery gets here first
        except Exception as e:  # the job's outcome stands; its reservation expires with its day
            log.warning("could not settle the quota of job %s: %s", job_id, e)
        try:
            bounded(
                lambda: self._write_end(job_id, status, request, batch, result, **fields),
                REGISTRY_CALL_S,
            )
        except FarmUnavailable:
            row = None
            if request is not None:
                row = {
                    "session": request.session,
                    "model": request.model,
                    "priority": request.priority,
                    "submitted_at": request.submitted_at or time.time(),
                }
            line = (
                None if batch is None else {"batch": batch.id, "line": batch.line, "result": result}
            )
            self.spool.add(job_id, status, row, fields, line=line)

    def _write_end(
        self,
        job_id: str,
        status: str,
        request: Request | None,
        batch: BatchLine | None,
        result: dict[str, Any] | None,
        **fields: Any,
    ) -> None:
        with transaction(self.ctx.database_url) as s:
            if batch is not None:
                queries.finish_batch_line(
                    s,
                    batch_id=batch.id,
                    line=batch.line,
                    job_id=job_id,
                    status=status,
                    result=result,
                    error=fields.get("error"),
                )
            if request is None:
                queries.record_finished(s, job_id=job_id, status=status, **fields)
            else:
                queries.record_ended(
                    s,
                    job_id=job_id,
                    status=status,
                    session=request.session,
                    model=request.model,
                    priority=request.priority,
                    submitted_at=datetime.fromtimestamp(request.submitted_at or time.time(), UTC),
                    **fields,
                )


def bounded(call: Callable[[], T], seconds: float) -> T:
    """`call()`, or FarmUnavailable when it has not returned within `seconds`.

    A database call can block for good on a connection whose peer vanished mid-request;
    the job must not block with it. The call goes on in its own thread (what it writes is
    idempotent) and the job retries or spools as for any outage."""
    result: list[Any] = []
    failure: list[BaseException] = []

    def run() -> None:
        try:
            result.append(call())
        except BaseException as e:
            failure.append(e)

    thread = threading.Thread(target=run, name="farm-registry-call", daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        raise FarmUnavailable(f"the registry did not answer within {seconds:g}s")
    if failure:
        raise failure[0]
    return result[0]


def usage_fields(c: Completion) -> dict[str, Any]:
    """The usage row's fields for a finished generation."""
    return {
        "prompt_tokens": c.usage.prompt_tokens,
        "cached_tokens": c.usage.cached_tokens,
        "completion_tokens": c.usage.completion_tokens,
        "finish_reason": c.finish_reason,
        "queue_wait_ms": c.timings.queue_wait_ms,
        "ttft_ms": c.timings.ttft_ms,
        "generation_ms": c.timings.generation_ms,
        "worker_id": c.worker,
    }
