"""Submitting a job: validate, check the registry, queue it, record it.

    request -> model known and enabled? -> fits its context? -> a live worker holds it?
            -> Celery send_task to the model's queue at the request's priority
            -> usage row "queued" (unless the worker already wrote "running")

If the broker refuses the message, nothing is recorded: nothing is half-queued. The row is
written after the send, not before, so that its commit overlaps the job instead of
delaying it (on SQLite it would also hold the write lock the worker needs to mark the job
running). Both sides insert the row if it is missing and never overwrite the other's, so
the row is the same whichever lands first.
"""

from __future__ import annotations

import logging
import time
import uuid
from datetime import UTC, datetime
from typing import Any

from kombu.exceptions import OperationalError as BrokerError

from farm.config import masked
from farm.context import FarmContext, get_context
from farm.errors import FarmUnavailable, InvalidRequest, NoLiveWorker
from farm.queue import TASK_NAME, priority_number, queue_name
from farm.registry import queries, transaction
from farm.request import Request
from farm.results import Job

log = logging.getLogger(__name__)


def submit_request(
    request: Request, *, wait_for_worker: float = 0.0, ctx: FarmContext | None = None
) -> Job:
    """Queue a validated request and return its Job at once.

    `wait_for_worker`: seconds to wait for a worker to start serving the model before
    giving up with NoLiveWorker (0: fail at once when none does).
    """
    check_seconds("wait_for_worker", wait_for_worker)
    ctx = ctx or get_context()
    ctx.broker_url  # noqa: B018 - fails first, and clearly, when no farm is running here
    _check_servable(ctx, request, wait_for_worker)
    job_id = str(uuid.uuid4())
    now = time.time()
    request = request.model_copy(update={"submitted_at": now})
    try:
        ctx.app.send_task(
            TASK_NAME,
            args=[request.to_wire()],
            task_id=job_id,
            queue=queue_name(request.model),
            priority=priority_number(request.priority),
            expires=ctx.settings.job_expires,
            # What Flower and logs show instead of the prompt, which is user data.
            argsrepr=_argsrepr(request, ctx),
            kwargsrepr="{}",
        )
    except BrokerError as e:
        raise FarmUnavailable(
            f"cannot reach the broker at {masked(ctx.broker_url)}: {_masked_error(e, ctx)}; "
            "is `farm up` running, "
            "or is FARM_BROKER_URL right?"
        ) from e
    try:
        with transaction(ctx.database_url) as s:
            queries.record_queued(
                s,
                job_id=job_id,
                session=request.session,
                model=request.model,
                priority=request.priority,
                submitted_at=datetime.fromtimestamp(now, UTC),
            )
    except FarmUnavailable:
        # The job is queued; the worker writes its row when it starts it.
        log.warning("job %s is queued but the registry could not record it yet", job_id)
    log.info("queued job %s for model %s at priority %s", job_id, request.model, request.priority)
    return Job(job_id, request.model, ctx)


def check_seconds(name: str, value: object, *, optional: bool = False) -> None:
    """InvalidRequest unless `value` is a number of seconds from 0 to a day (or None)."""
    if value is None and optional:
        return
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    if not ok or not 0 <= value <= 86400:  # type: ignore[operator]
        shown = repr(value)
        shown = shown[:40] + "..." if len(shown) > 40 else shown
        raise InvalidRequest(
            f"invalid '{name}': give seconds, a number from 0 to 86400 (got {shown})"
        )


def _masked_error(e: Exception, ctx: FarmContext) -> str:
    """The broker error's text, with the broker's URL (and so its password) masked."""
    return str(e).replace(ctx.broker_url, masked(ctx.broker_url))


SERVABLE_CACHE_S = 1.0


def _check_servable(ctx: FarmContext, request: Request, wait_for_worker: float) -> None:
    """Raise unless the model is known, the request fits it, and a live worker serves it.

    A model seen served is trusted for SERVABLE_CACHE_S, which keeps two registry reads
    off every submit in a burst; a job that still finds no worker expires from its queue.
    """
    cached = ctx.servable.get(request.model)
    if cached is not None and cached[0] > time.monotonic():
        _check_fits(request, request.model, cached[1])
        return
    deadline = time.monotonic() + wait_for_worker
    while True:
        with transaction(ctx.database_url) as s:
            model = queries.get_model(s, request.model)
            _check_fits(request, model.name, model.n_ctx)
            if queries.live_leases(s, request.model):
                ctx.servable[model.name] = (time.monotonic() + SERVABLE_CACHE_S, model.n_ctx)
                return
        if time.monotonic() >= deadline:
            raise NoLiveWorker(
                f"no worker is serving model '{request.model}'; start one with "
                f"`farm worker --model {request.model}` (or `farm up --model {request.model}`), or pass "
                "--wait-for-worker SECONDS to wait for one"
            )
        time.sleep(0.25)


def _check_fits(request: Request, model: str, n_ctx: int) -> None:
    if request.stopping.max_tokens > n_ctx:
        raise InvalidRequest(
            f"invalid 'stopping.max_tokens': {request.stopping.max_tokens} is more than "
            f"model '{model}' can hold (context {n_ctx} tokens)"
        )


def _argsrepr(request: Request, ctx: FarmContext) -> str:
    if ctx.settings.log_prompts:
        return repr(request.to_wire())
    size = len(request.prompt or "") + sum(len(m.content) for m in request.messages or ())
    kind = "chat" if request.is_chat else "prompt"
    return f"({kind} of {size} chars, session={request.session!r})"


def build(prompt: str | None, **fields: Any) -> Request:
    """A Request from `farm.infer`/`farm.submit` style arguments (flat or nested)."""
    from farm.request import make_request

    data = {k: v for k, v in fields.items() if v is not None}
    if prompt is not None:
        data["prompt"] = prompt
    return make_request(data)
