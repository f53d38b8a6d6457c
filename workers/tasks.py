"""The Celery task a worker runs for each job: one request in, one Completion out.

    cancelled already? -> usage "running" (skip if this job already ended: a redelivery)
      -> ModelHost.generate (the model's engine runs it beside the worker's other jobs),
         each piece of text appended to the job's Redis stream
      -> usage completed once (idempotent on the job id) -> final event -> Completion

Whatever the worker cannot serve fails that job with a reason (JobFailed); the worker
keeps serving the next one.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, TypeVar

import redis
from celery import Celery, Task, states
from celery.exceptions import Ignore, Reject
from pydantic import ValidationError

from farm.admission import quotas
from farm.completion import Completion, Timings, Usage
from farm.context import FarmContext
from farm.errors import FarmError, FarmUnavailable, JobFailed
from farm.queue import QUEUE_PREFIX, TASK_NAME, cancel_key, progress_key
from farm.registry import queries, transaction
from farm.request import BatchLine, Request, describe_errors
from farm.stream import (
    CANCELLED,
    DONE,
    FAILED,
    RECONNECT_WINDOW_S,
    RESTART,
    TOKEN,
    last_event,
    publish,
)
from workers.models import ModelCache
from workers.spool import UsageSpool

log = logging.getLogger(__name__)
T = TypeVar("T")


class JobRunner:
    """Runs jobs for the models this worker hosts."""

    def __init__(
        self, ctx: FarmContext, worker_id: str, models: ModelCache, spool: UsageSpool | None = None
    ):
        self.ctx = ctx
        self.worker_id = worker_id
        self.models = models
        self.spool = spool or UsageSpool(ctx.settings.home / "spool", worker_id)

    def run(self, task: Task, payload: dict[str, Any]) -> dict[str, Any]:
        job_id = task.request.id
        try:
            request = Request.model_validate(payload)
        except ValidationError as e:
            # A producer other than farm's client sent it: fail it (with a row), keep serving.
            return self._fail(
                job_id, f"invalid request: {describe_errors(e)}", _stand_in(task, payload)
            )
        try:
            return self._run(task, job_id, request)
        except (Ignore, Reject, JobFailed):
            raise
        except Exception as e:
            # Whatever went wrong, the job ends with a reason and the worker goes on.
            log.exception("job %s failed unexpectedly", job_id)
            return self._fail(job_id, f"the worker hit an error: {type(e).__name__}: {e}", request)

    def _run(self, task: Task, job_id: str, request: Request) -> dict[str, Any]:
        ctx, r = self.ctx, self.ctx.redis
        started_wall = time.time()
        if request.model not in self.models.specs:
            return self._fail(
                job_id, f"worker {self.worker_id} does not serve '{request.model}'", request
            )

        submitted = request.submitted_at or started_wall
        stream_ttl = ctx.settings.job_time_limit + ctx.settings.stream_ttl
        redelivered = bool((task.request.delivery_info or {}).get("redelivered"))
        first = [True]

        def on_text(piece: str) -> None:
            if request.stream_tokens:
                self._publish(job_id, TOKEN, ttl=stream_ttl if first[0] else None, text=piece)
                first[0] = False

        def should_cancel(tokens: int) -> bool:  # polled a few times a second while it runs
            pipe = r.pipeline(transaction=False)
            pipe.exists(cancel_key(job_id))
            if request.batch is None:  # nobody follows a batch line: keep Redis small
                pipe.set(progress_key(job_id), tokens, ex=stream_ttl)  # for `farm status JOB`
            try:
                return bool(pipe.execute()[0])
            except redis.RedisError:
                return False  # Redis restarting or slow: ask again at the next poll

        try:
            # Loads the model first if it is not loaded (on demand); holds it for the job.
            with self.models.use(request.model) as host:
                # The engine starts on the prompt while the registry marks the job running:
                # the write is off the job's path. Should the row say the job must not run
                # (cancelled while queued, or ended by an earlier delivery), it is stopped.
                seq = host.start(request, time_limit_s=ctx.settings.job_time_limit, label=job_id)
                try:
                    self._admit(task, job_id, request, submitted, redelivered)
                    if redelivered and request.batch is None:
                        # An earlier delivery died part-way: tell streaming readers that the
                        # text starts over (the Completion holds the whole of this run's text).
                        self._publish(job_id, RESTART, ttl=stream_ttl, worker=self.worker_id)
                    gen = host.follow(seq, on_text=on_text, should_cancel=should_cancel)
                except BaseException:
                    seq.cancel()  # whatever ended this job early, its slot is freed now
                    raise
        except _Done as done:
            return done.result
        except FarmError as e:
            return self._fail(job_id, str(e), request)

        queue_wait_ms = max(0.0, (started_wall - submitted) * 1000)
        completion = Completion(
            job_id=job_id,
            model=request.model,
            text=gen.text,
            finish_reason=gen.finish_reason,
            usage=Usage(
                prompt_tokens=gen.prompt_tokens,
                completion_tokens=gen.completion_tokens,
                cached_tokens=gen.cached_tokens,
            ),
            timings=Timings(
                queue_wait_ms=queue_wait_ms, ttft_ms=gen.ttft_ms, generation_ms=gen.generation_ms
            ),
            worker=self.worker_id,
        )
        fields = _usage_fields(completion)
        if gen.finish_reason == "cancelled":
            self._end(job_id, "cancelled", batch=request.batch, **fields)
            self._publish(job_id, CANCELLED, ttl=ctx.settings.stream_ttl)
            task.update_state(state=states.REVOKED)
            raise Ignore()
        # The caller waits for this event: send it first, then write the usage row. Should
        # the worker die in between, the redelivered job finds this event and writes usage.
        # A batch line has no caller: its result goes on its line, in the usage write, and
        # Redis holds nothing per line (a 100,000-line batch leaves no 100,000 streams).
        if request.batch is None:
            self._publish(
                job_id, DONE, ttl=ctx.settings.stream_ttl, completion=completion.model_dump_json()
            )
        result = completion.model_dump(mode="json")
        self._end(job_id, "succeeded", batch=request.batch, result=result, **fields)
        log.info(
            "job %s done: %d+%d tokens, %s, %.0f ms",
            job_id,
            gen.prompt_tokens,
            gen.completion_tokens,
            gen.finish_reason,
            gen.generation_ms,
        )
        return completion.model_dump(mode="json")

    def _admit(
        self, task: Task, job_id: str, request: Request, submitted: float, redelivered: bool
    ) -> None:
        """Mark the job running; raise when it must not run (Ignore, or _Done with the
        result an earlier delivery already produced)."""
        ctx = self.ctx
        ended = self._record_started(job_id, request, submitted)
        if ended == "cancelled":
            log.info("job %s was cancelled while queued; skipped", job_id)
            self._publish(job_id, CANCELLED, ttl=ctx.settings.stream_ttl)
            task.update_state(state=states.REVOKED)
            raise Ignore()
        if ended is None and not redelivered:
            return
        previous = self._previous_completion(job_id)
        if previous is not None:
            # A delivery before this one finished the job (and may have died before its
            # acknowledgement, or even before its usage write): do not generate twice.
            log.warning("job %s was delivered again after it ended; not run twice", job_id)
            result = previous.model_dump(mode="json")
            self._end(
                job_id, "succeeded", batch=request.batch, result=result, **_usage_fields(previous)
            )
            raise _Done(result)
        if ended is not None:
            # It ended (failed, expired or succeeded) and its usage is written: a recorded
            # outcome is never followed by another run of the same job.
            log.warning("job %s was delivered again after it %s; not run again", job_id, ended)
            if ended in ("failed", "expired"):
                self._publish(
                    job_id, FAILED, ttl=ctx.settings.stream_ttl, error=self._error_of(job_id)
                )
            raise Ignore()

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

    def _publish(self, job_id: str, kind: str, **fields: Any) -> None:
        """An event on the job's stream. A Redis that restarts (farm up restarts its broker)
        does not fail the job: the write is retried for RECONNECT_WINDOW_S."""
        deadline, delay = time.monotonic() + RECONNECT_WINDOW_S, 0.1
        while True:
            try:
                publish(self.ctx.redis, job_id, kind, **fields)
                return
            except (redis.ConnectionError, redis.TimeoutError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(delay)
                delay = min(delay * 2, 1.0)

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

    def _end(
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

    def expired(self, job_id: str, expires: Any, args: Any) -> None:
        """Celery dropped the job unrun: it waited past its expiry (the caller gave up)."""
        reason = (
            f"the job expired in its queue (at {expires}) before a worker was free; it was "
            "not run. The submitting side sets the expiry: FARM_JOB_EXPIRES"
        )
        log.warning("job %s expired in its queue; dropped", job_id)
        try:
            request: Request | None = Request.model_validate(args[0])
        except (ValidationError, IndexError, TypeError, KeyError):
            request = None
        self._end(job_id, "expired", request, error=reason)
        if request is None or request.batch is None:  # the feeder queues a batch line again
            self._publish(job_id, FAILED, ttl=self.ctx.settings.stream_ttl, error=reason)

    def _fail(self, job_id: str, reason: str, request: Request | None = None) -> dict[str, Any]:
        log.warning("job %s failed: %s", job_id, reason)
        batch = request.batch if request is not None else None
        self._end(job_id, "failed", request, batch=batch, error=reason, worker_id=self.worker_id)
        if batch is None:  # a batch line's error is on its line
            self._publish(job_id, FAILED, ttl=self.ctx.settings.stream_ttl, error=reason)
        raise JobFailed(reason)


REGISTRY_CALL_S = 20.0  # a registry call that has not answered by then counts as an outage


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


class _Done(Exception):
    """The job was already done by an earlier delivery: return this result."""

    def __init__(self, result: dict[str, Any]):
        self.result = result


def _stand_in(task: Task, payload: Any) -> Request:
    """A request to record a malformed job's row by: its model and session where they are
    usable, else the queue's model and 'unknown'."""
    queue = str((task.request.delivery_info or {}).get("routing_key") or "")
    data = payload if isinstance(payload, dict) else {}
    fields = {
        "model": data.get("model") if isinstance(data.get("model"), str) else "",
        "session": data.get("session") if isinstance(data.get("session"), str) else "",
    }
    fallback = {"model": queue.removeprefix(QUEUE_PREFIX) or "unknown", "session": "unknown"}
    for candidate in (fields, {**fields, "session": "unknown"}, fallback):
        try:
            return Request.model_validate({"prompt": "-", **candidate})
        except ValidationError:
            continue
    return Request.model_validate({"prompt": "-", "model": "unknown", "session": "unknown"})


def _usage_fields(c: Completion) -> dict[str, Any]:
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


def register_task(app: Celery, runner: JobRunner) -> Task:
    """Bind the runner to the app as the task clients send by name (`queue.TASK_NAME`)."""

    # The success event that Flower shows carries repr(result): the generated text, which is
    # user data. Keep it out unless prompts may be shown (FARM_LOG_PROMPTS).
    shown = 1024 if runner.ctx.settings.log_prompts else 0

    @app.task(
        name=TASK_NAME,
        bind=True,
        acks_late=True,
        reject_on_worker_lost=True,
        # An expected outcome, not a crash: Celery logs it as one line, no traceback.
        throws=(JobFailed,),
        resultrepr_maxsize=shown,
    )
    def generate(self: Task, payload: dict[str, Any]) -> dict[str, Any]:
        return runner.run(self, payload)

    return generate
