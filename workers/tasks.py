"""The Celery task a worker runs for each job: one request in, one Completion out.

    cancelled already? -> usage "running" (skip if this job already ended: a redelivery)
      -> ModelHost.generate (the model's engine runs it beside the worker's other jobs),
         each piece of text appended to the job's Redis stream
      -> usage completed once (idempotent on the job id) -> final event -> Completion

The exactly-once bookkeeping (the usage row, redeliveries, the spool) is
`workers.bookkeeping`'s; this module is the job's path through it. Whatever the worker
cannot serve fails that job with a reason (JobFailed); the worker keeps serving the next one.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from typing import Any

import redis
from celery import Celery, Task, states
from celery.exceptions import Ignore, Reject
from pydantic import ValidationError

from farm import redis_url
from farm.completion import Choice, Completion, Timings, Usage, encode_vector
from farm.context import FarmContext
from farm.errors import FarmError, JobFailed
from farm.fair import fleet
from farm.queue import QUEUE_PREFIX, TASK_NAME, cancel_key, progress_key
from farm.request import Request, describe_errors
from farm.stream import (
    CANCELLED,
    CANCELLED_,
    DONE,
    FAILED,
    LOST,
    RESTART,
    TOKEN,
    TOOL_CALL,
    WRITTEN,
    Fenced,
)
from farm.tools.schema import ToolCallDelta
from workers.bookkeeping import Admission, Bookkeeper, usage_fields
from workers.choices import Outcome
from workers.models import ModelCache
from workers.spool import UsageSpool
from workers.stream import RunKeeper, StreamWriter, patiently

log = logging.getLogger(__name__)


class JobRunner:
    """Runs jobs for the models this worker hosts."""

    def __init__(
        self, ctx: FarmContext, worker_id: str, models: ModelCache, spool: UsageSpool | None = None
    ):
        self.ctx = ctx
        self.worker_id = worker_id
        self.models = models
        self.spool = spool or UsageSpool(ctx.settings.home / "spool", worker_id)
        self.books = Bookkeeper(ctx, worker_id, self.spool)
        settings = ctx.settings
        interval = min(settings.heartbeat_interval, settings.lease_ttl / 3)
        keeper_redis = redis_url.client(
            ctx.result_url, connect_timeout=interval, socket_timeout=interval
        )
        self.run_keys = RunKeeper(keeper_redis, interval)
        self.writer = StreamWriter(ctx.redis)

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
        # One run of a job at a time in the fleet: wait while another run holds it (a broker
        # restart hands the message out again while the first run goes on); then the
        # bookkeeping finds what that run left (its result, or nothing if it died).
        fence = Fenced(r, job_id, f"{self.worker_id}:{uuid.uuid4().hex}", ctx.settings.lease_ttl)
        if self._wait_for_other_run(fence):
            redelivered = True
        self.run_keys.hold(fence)
        try:
            return self._run_held(task, job_id, request, fence, started_wall, submitted,
                                  stream_ttl, redelivered)  # fmt: skip
        except (Ignore, Reject, JobFailed):
            raise
        except Exception:
            # run() fails the job on this error, unless this run lost it meanwhile: a worker
            # cut off from Redis past the window it rides out (its writes gave up) was
            # taken over by another run, whose result a failure written now would follow.
            self._unless_taken_over(fence)
            raise
        finally:
            self.run_keys.drop(fence)
            try:
                fence.release()
            except redis.RedisError as e:  # it expires on its own
                log.debug("job %s: run key not released: %s", job_id, e)

    def _wait_for_other_run(self, fence: Fenced) -> bool:
        """Take the job for this run; True when another run held it first (and has ended
        or died since: its key is renewed while it lives, so the wait has no other bound).
        While Redis is unreachable, Reject: the job goes back to its queue."""
        waited = False
        while True:
            try:
                if patiently(fence.claim):
                    return waited
            except redis.RedisError as e:
                raise Reject(f"cannot reach Redis to take the job: {e}", requeue=True) from e
            if not waited:
                log.warning(
                    "job %s is running elsewhere; this delivery waits for that run to end",
                    fence.job_id,
                )
            waited = True
            time.sleep(0.25)

    def _run_held(
        self,
        task: Task,
        job_id: str,
        request: Request,
        fence: Fenced,
        started_wall: float,
        submitted: float,
        stream_ttl: int,
        redelivered: bool,
    ) -> dict[str, Any]:
        ctx, r = self.ctx, self.ctx.redis
        # Tokens generated when the run learnt it must stop (cancelled, or taken over):
        # what it generated after that is neither streamed nor billed.
        stopped: dict[str, Any] = {}

        stopping = threading.Lock()  # stop() comes from this thread and the stream writer's

        def stop(why: int, seq: Any) -> None:
            with stopping:
                if not stopped:
                    stopped.update(why=why, tokens=seq.generated)
            seq.cancel()

        def refused(outcome: int) -> None:  # the stream writer's: cancelled, or taken over
            stop(outcome, seq)

        several = request.choices > 1

        def on_text(piece: str, index: int, logprobs: list[dict[str, Any]] | None) -> None:
            if request.stream_tokens and not stopped:
                fields: dict[str, Any] = {"text": piece}
                if several:
                    fields["index"] = str(index)
                if logprobs is not None:
                    fields["logprobs"] = logprobs
                self.writer.write(fence, TOKEN, ttl=stream_ttl, refused=refused, **fields)

        def on_tool_call(delta: ToolCallDelta, index: int) -> None:
            if request.stream_tokens and not stopped:
                fields: dict[str, Any] = {"delta": delta.model_dump_json(exclude_none=True)}
                if several:
                    fields["index"] = str(index)
                self.writer.write(fence, TOOL_CALL, ttl=stream_ttl, refused=refused, **fields)

        def should_cancel(tokens: int) -> bool:  # polled a few times a second while it runs
            pipe = r.pipeline(transaction=False)
            pipe.exists(cancel_key(job_id))
            if request.batch is None:  # nobody follows a batch line: keep Redis small
                pipe.set(progress_key(job_id), tokens, ex=stream_ttl)  # for `farm status JOB`
            if fence.lost:
                stop(LOST, seq)
            try:
                if pipe.execute()[0]:
                    stop(CANCELLED_, seq)
            except redis.RedisError:
                pass  # Redis restarting or slow: ask again at the next poll
            return bool(stopped)

        try:
            # Loads the model first if it is not loaded (on demand); holds it for the job.
            with self.models.use(request.model) as host:
                # The engine starts on the prompt while the registry marks the job running:
                # the write is off the job's path. Should the row say the job must not run
                # (cancelled while queued, or ended by an earlier delivery), it is stopped.
                # A job nobody streams has no per-token events: its thread waits for the end.
                seq = host.start(
                    request,
                    time_limit_s=ctx.settings.job_time_limit,
                    label=job_id,
                    streamed=request.stream_tokens,
                )
                # Taking this job opened a place in its model's queue: the next fair turn
                # fills it (while the engine reads the prompt, off the job's path).
                fleet.on_take(ctx, request.model)
                try:
                    admission = self.books.admit(job_id, request, submitted, redelivered)
                    if not admission.run:
                        seq.cancel()
                        fleet.settle(ctx, job_id, request, 0, 0)  # e.g. cancelled while queued
                        return _not_run(task, admission)
                    if redelivered and request.batch is None:
                        # An earlier delivery died part-way: tell streaming readers that the
                        # text starts over (the Completion holds the whole of this run's text).
                        patiently(
                            lambda: fence.publish(RESTART, ttl=stream_ttl, worker=self.worker_id)
                        )
                    try:
                        gen = host.follow(
                            seq,
                            on_text=on_text,
                            should_cancel=should_cancel,
                            on_tool_call=on_tool_call,
                        )
                    except BaseException:
                        seq.cancel()  # its slot stops before the drain waits on Redis
                        raise
                    finally:  # its text is on its stream before anything ends the job
                        self.writer.drain(fence)
                except BaseException:
                    seq.cancel()  # whatever ended this job early, its slot is freed now
                    raise
        except FarmError as e:
            if patiently(fence.check) == LOST:  # the job is another run's to end
                return self._taken_over(job_id)
            return self._fail(job_id, str(e), request)

        if stopped.get("why") == LOST:
            return self._taken_over(job_id)
        # A batch line streams nothing: whether it was cancelled meanwhile, ask now.
        found = patiently(fence.check) if not stopped and request.batch is not None else WRITTEN
        if found == LOST:
            return self._taken_over(job_id)
        if found != WRITTEN:
            stopped.update(why=found, tokens=gen.completion_tokens)
        if stopped:
            gen.finish_reason = "cancelled"
            gen.completion_tokens = min(gen.completion_tokens, stopped["tokens"])
        queue_wait_ms = max(0.0, (started_wall - submitted) * 1000)
        completion = Completion(
            job_id=job_id,
            model=request.model,
            text=gen.text,
            tool_calls=gen.tool_calls,
            finish_reason=gen.finish_reason,
            usage=Usage(
                prompt_tokens=gen.prompt_tokens,
                completion_tokens=gen.completion_tokens,
                cached_tokens=gen.cached_tokens,
            ),
            timings=Timings(
                queue_wait_ms=queue_wait_ms,
                ttft_ms=gen.ttft_ms,
                generation_ms=gen.generation_ms,
                drafted_tokens=gen.drafted_tokens,
                drafted_kept=gen.drafted_kept,
            ),
            worker=self.worker_id,
            choices=choices_of(gen, request),
            embeddings=None if gen.embeddings is None else list(map(encode_vector, gen.embeddings)),
        )
        if gen.finish_reason != "cancelled" and request.batch is None:
            # The caller waits for this event: send it first, then write the usage row.
            # Should the worker die in between, the redelivered job finds this event and
            # writes usage. A batch line has no caller: its result goes on its line, in the
            # usage write, and Redis holds nothing per line (a 100,000-line batch leaves no
            # 100,000 streams). A cancel that lands before this write wins over the result.
            done = completion.model_dump_json()
            written = patiently(
                lambda: fence.publish(DONE, ttl=ctx.settings.stream_ttl, completion=done)
            )
            if written == LOST:
                return self._taken_over(job_id)
            if written == CANCELLED_:
                completion.finish_reason = "cancelled"
        fields = usage_fields(completion)
        fleet.settle(ctx, job_id, request, gen.prompt_tokens, completion.usage.completion_tokens)
        if completion.finish_reason == "cancelled":
            # As for a result: the stream's final event first, then the row (a reader that
            # finds the row cancelled finds the event on the stream too).
            patiently(lambda: fence.publish(CANCELLED, ttl=ctx.settings.stream_ttl))
            self.books.end(job_id, "cancelled", batch=request.batch, **fields)
            task.update_state(state=states.REVOKED)
            raise Ignore()
        result = completion.model_dump(mode="json")
        self.books.end(job_id, "succeeded", batch=request.batch, result=result, **fields)
        log.info(
            "job %s done: %d+%d tokens, %s, %.0f ms",
            job_id,
            gen.prompt_tokens,
            gen.completion_tokens,
            gen.finish_reason,
            gen.generation_ms,
        )
        return completion.model_dump(mode="json")

    def _unless_taken_over(self, fence: Fenced) -> None:
        """Return if this run still holds the job (its failure is its to write). Raise Ignore
        when another run took it over, and Reject (back to its queue, nothing written) while
        Redis cannot say which."""
        try:
            held = patiently(fence.check)
        except redis.RedisError as e:
            log.warning(
                "job %s: cannot reach Redis to learn whether this run still holds it; it goes "
                "back to its queue, no outcome written",
                fence.job_id,
            )
            raise Reject(f"cannot reach Redis to end the job: {e}", requeue=True) from e
        if held == LOST:
            self._taken_over(fence.job_id)

    def _taken_over(self, job_id: str) -> dict[str, Any]:
        """This run lost the job (its worker was cut off past the run key's ttl and another
        took the job over): it wrote nothing after that and leaves the job to that run."""
        log.warning("job %s was taken over by another run; this run stops, writing nothing", job_id)
        raise Ignore()

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
        self.books.end(job_id, "expired", request, error=reason)
        if request is None or request.batch is None:  # the feeder queues a batch line again
            self.books.publish(job_id, FAILED, ttl=self.ctx.settings.stream_ttl, error=reason)

    def _fail(self, job_id: str, reason: str, request: Request | None = None) -> dict[str, Any]:
        log.warning("job %s failed: %s", job_id, reason)
        batch = request.batch if request is not None else None
        if request is not None:
            fleet.on_take(self.ctx, request.model)  # it may have failed before its start
            fleet.settle(self.ctx, job_id, request, 0, 0)
        self.books.end(
            job_id, "failed", request, batch=batch, error=reason, worker_id=self.worker_id
        )
        if batch is None:  # a batch line's error is on its line
            self.books.publish(job_id, FAILED, ttl=self.ctx.settings.stream_ttl, error=reason)
        raise JobFailed(reason)


def choices_of(gen: Outcome, request: Request) -> list[Choice]:
    """The Completion's choices: every one when the job has several or logprobs, else none
    (its text and finish reason say it all)."""
    if request.choices == 1 and request.logprobs is None:
        return []
    return [
        Choice(
            index=i,
            text=g.text,
            finish_reason=g.finish_reason,
            completion_tokens=g.completion_tokens,
            logprobs=g.logprobs,
            tool_calls=g.tool_calls,
        )
        for i, g in enumerate(gen.choices)
    ]


def _not_run(task: Task, admission: Admission) -> dict[str, Any]:
    """End a job the bookkeeping says must not run: an earlier delivery's result is the
    job's result; a job cancelled while queued ends revoked; one that ended is ignored."""
    if admission.result is not None:
        return admission.result
    if admission.cancelled:
        task.update_state(state=states.REVOKED)
    raise Ignore()


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


def register_task(app: Celery, runner: JobRunner) -> Task:
    """Bind the runner to the app as the task clients send by name (`queue.TASK_NAME`)."""

    # The success event that Flower shows carries repr(result): the generated text, which is
    # user data. Keep it out unless prompts may be shown (FARM_LOG_PROMPTS).
    shown = 1024 if runner.ctx.settings.log_prompts else 0

    @app.task(
        name=TASK_NAME,
        # This app's alone: a shared task would attach itself to every app made later in
        # the process (a second in-process worker's, in the tests) and clash with its own.
        shared=False,
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
