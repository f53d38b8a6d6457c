"""Submitting a job: validate, check the registry, queue it, record it.

    request -> model known and enabled? -> fits its context? -> a live worker holds it?
            -> Celery send_task to the model's queue at the request's priority
               (held under its session until its fair turn: farm/fair/)
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
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

from kombu.exceptions import KombuError
from kombu.exceptions import OperationalError as BrokerError

from farm import redis_url
from farm.admission import quotas
from farm.config import masked
from farm.context import FarmContext, get_context
from farm.depth import queued
from farm.errors import FarmError, FarmUnavailable, InvalidRequest, NoLiveWorker, QueueFull
from farm.fair import held
from farm.queue import FAIR_HEADER, TASK_NAME, priority_number, queue_name, rejections_key
from farm.registry import queries, transaction
from farm.request import Request, make_request, oversized
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
    _check_size(ctx, request)
    ctx.broker_url  # noqa: B018 - fails first, and clearly, when no farm is running here
    _check_servable(ctx, request, wait_for_worker)
    _check_room(ctx, request.model, 1)
    job = _Prepared(request)
    rate = quotas.reserve(ctx, job.id, request)
    try:
        _send(ctx, job)
    except BrokerError as e:
        _release(ctx, [job])
        raise _unreachable(ctx, e) from e
    _record(ctx, [job])
    log.info("queued job %s for model %s at priority %s", job.id, request.model, request.priority)
    queued = Job(job.id, request.model, ctx)
    queued.rate = rate
    return queued


BULK_CHUNK = 1000  # messages per pipelined publish (kombu's default batch size)


def submit_many(
    items: Iterable[Request | dict[str, Any]],
    *,
    ctx: FarmContext | None = None,
    job_ids: list[str] | None = None,
    rate: bool = True,
) -> list[Job | FarmError]:
    """Queue many requests at once: one Job or one error per item, in the items' order.

    Each item is validated on its own (a dict is built into a Request); an item that
    fails gets its error (InvalidRequest, UnknownModel, NoLiveWorker) and nothing is queued
    for it. The rest are published in pipelined batches of BULK_CHUNK and recorded in the
    registry in one transaction. Should the broker fail part-way, the items not queued get
    FarmUnavailable; those queued are recorded and returned as Jobs.

    `job_ids`: the items' job ids, one per item (the batch feeder's, derived from the line,
    so that a line queued again after a crash is the same job); new ones by default.
    """
    ctx = ctx or get_context()
    ctx.broker_url  # noqa: B018
    results: list[Job | FarmError | None] = []
    pending: list[tuple[int, Request]] = []
    for item in items:
        try:
            request = item if isinstance(item, Request) else _build_item(item)
            _check_size(ctx, request)
        except FarmError as e:
            results.append(e)
            continue
        results.append(None)
        pending.append((len(results) - 1, request))
    if job_ids is not None and len(job_ids) != len(results):
        raise ValueError(f"{len(job_ids)} job ids for {len(results)} items")
    contexts: dict[str, int | FarmError] = {}
    for model in dict.fromkeys(r.model for _, r in pending):
        try:
            contexts[model] = _served_context(ctx, model, 0.0)
        except FarmError as e:
            contexts[model] = e
    room: dict[str, int] = {}
    prepared: list[tuple[int, _Prepared]] = []
    for i, request in pending:
        try:
            n_ctx = contexts[request.model]
            if isinstance(n_ctx, FarmError):
                if isinstance(n_ctx, NoLiveWorker):
                    _check_embeddable(ctx, request)
                raise n_ctx
            _check_fits(request, request.model, n_ctx)
            _check_embeddable(ctx, request)
            if request.model not in room:
                room[request.model] = _room(ctx, request.model)
            if room[request.model] <= 0:
                raise _full(ctx, request.model)
            job = _Prepared(request, job_ids[i] if job_ids is not None else None)
            quotas.reserve(ctx, job.id, request, rate=rate)
            room[request.model] -= 1
        except FarmError as e:
            results[i] = e
            continue
        prepared.append((i, job))
    for _, job in prepared:  # this process's own submits, until the depth is read again
        if job.request.model in ctx.depth:
            ctx.depth[job.request.model][2] += 1
    sent: list[tuple[int, _Prepared]] = []
    try:
        with ctx.app.producer_or_acquire() as producer:
            for start in range(0, len(prepared), BULK_CHUNK):
                chunk = prepared[start : start + BULK_CHUNK]
                try:
                    with producer.batch(max_size=2 * len(chunk) + 1):  # one flush, at the end
                        for _, job in chunk:
                            _send(ctx, job, producer)
                except BrokerError:
                    raise  # no connection: nothing of this chunk was sent
                except KombuError as e:
                    # The flush failed part-way: these may or may not be queued.
                    uncertain = FarmUnavailable(
                        f"the broker failed while these jobs were sent ({_masked_error(e, ctx)}); "
                        "each may or may not be queued: check with `farm jobs` before resending"
                    )
                    for i, _ in prepared[start:]:
                        results[i] = uncertain
                    break
                sent += chunk
    except KombuError as e:  # no connection at all: nothing of what is left was sent
        error = _unreachable(ctx, e)
        for i, _ in prepared[len(sent) :]:
            if results[i] is None:
                results[i] = error
    finally:
        _record(ctx, [job for _, job in sent])
        _release(
            ctx, [job for i, job in prepared[len(sent) :] if isinstance(results[i], FarmError)]
        )
    for i, job in sent:
        results[i] = Job(job.id, job.request.model, ctx)
    log.info("queued %d of %d jobs in bulk", len(sent), len(results))
    return [r for r in results if r is not None]


DEPTH_CACHE_S = 1.0


def _room(ctx: FarmContext, model: str) -> int:
    """How many more jobs the model's queue takes (FARM_MAX_QUEUED), counting this
    process's own submits since the depth was last read; a large number when unlimited."""
    limit = ctx.settings.max_queued
    if limit == 0:
        return 1 << 62
    now = time.monotonic()
    seen = ctx.depth.get(model)
    # Read the depth again once a second, and on every submit near the limit.
    if seen is None or seen[0] < now or seen[1] + seen[2] >= 0.9 * limit:
        try:
            seen = ctx.depth[model] = [now + DEPTH_CACHE_S, float(queued(ctx, model)), 0.0]
        except Exception as e:  # Redis unreachable: the publish says so, clearly, next
            log.debug("queue depth of %s unknown: %s", model, e)
            return 1 << 62
    return int(limit - seen[1] - seen[2])


def _check_room(ctx: FarmContext, model: str, n: int) -> None:
    if _room(ctx, model) < n:
        raise _full(ctx, model)
    if model in ctx.depth:
        ctx.depth[model][2] += n


def _full(ctx: FarmContext, model: str) -> QueueFull:
    depth = ctx.depth.get(model, [0, 0, 0])
    try:
        ctx.redis.incr(rejections_key(model, "queue_full"))  # farm_rejections_total
    except Exception as e:  # the count is for metrics; the refusal stands regardless
        log.debug("could not count a rejection: %s", e)
    return QueueFull(
        f"model '{model}' has {int(depth[1] + depth[2])} jobs queued, the most allowed "
        f"(FARM_MAX_QUEUED={ctx.settings.max_queued}); nothing was queued: try again when "
        "the queue has drained, or start more workers for it"
    )


def _check_size(ctx: FarmContext, request: Request) -> None:
    """InvalidRequest when the request carries more text than FARM_MAX_PROMPT_CHARS: read
    before the registry is, whatever the model's context."""
    refused = oversized(request, ctx.settings.max_prompt_chars)
    if refused is not None:
        field, reason = refused
        raise InvalidRequest(f"invalid '{field}': {reason}")


def _build_item(item: object) -> Request:
    if not isinstance(item, dict):
        raise InvalidRequest(f"each item must be a Request or a dict, not {type(item).__name__}")
    return make_request(item)


class _Prepared:
    """A request about to be queued: its job id and the time it was submitted."""

    __slots__ = ("id", "request", "submitted_at")

    def __init__(self, request: Request, job_id: str | None = None):
        self.id = job_id or str(uuid.uuid4())
        self.submitted_at = time.time()
        self.request = request.model_copy(update={"submitted_at": self.submitted_at})


def _send(ctx: FarmContext, job: _Prepared, producer: Any = None) -> None:
    request = job.request
    step = priority_number(request.priority, batch=request.batch is not None)
    found = quotas.limits(ctx, request.session)
    weight = found.weight if found is not None else 1.0
    ctx.app.send_task(
        TASK_NAME,
        args=[request.to_wire()],
        task_id=job.id,
        queue=queue_name(request.model),
        priority=step,
        expires=ctx.settings.job_expires,
        # Held under its session until its fair turn (farm/fair/, the transport's _put).
        headers={FAIR_HEADER: held.header(request, step, weight, ctx.settings.fair_output_weight)},
        # What Flower and logs show instead of the prompt, which is user data.
        argsrepr=_argsrepr(request, ctx),
        kwargsrepr="{}",
        # A batch line's outcome goes to its line in the registry; nobody reads a result.
        ignore_result=request.batch is not None,
        producer=producer,
    )


def _record(ctx: FarmContext, jobs: list[_Prepared]) -> None:
    """The queued jobs' usage rows, written behind the caller (registry/recorder.py)."""
    if jobs:
        ctx.recorder.add(
            [
                {
                    "job_id": job.id,
                    "session": job.request.session,
                    "model": job.request.model,
                    "priority": job.request.priority,
                    "submitted_at": datetime.fromtimestamp(job.submitted_at, UTC),
                }
                for job in jobs
            ]
        )


def _release(ctx: FarmContext, jobs: list[_Prepared]) -> None:
    """Give back the quota reserved for jobs that were not queued."""
    for job in jobs:
        try:
            quotas.settle(ctx, job.id, 0)
        except Exception as e:
            # Redis gone too: the reservation expires with its day, and the caller is about
            # to hear that the broker is unreachable; a line above that would only confuse.
            log.debug("could not release the quota of unqueued job %s: %s", job.id, e)


def _unreachable(ctx: FarmContext, e: Exception) -> FarmUnavailable:
    return FarmUnavailable(
        f"cannot reach the broker at {masked(ctx.broker_url)}: {_masked_error(e, ctx)}; "
        "is `farm up` running, or is FARM_BROKER_URL right?"
    )


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
    """The broker error's text, with the broker's URL (and so its password) masked, as farm
    and as Celery spell it (a Sentinel URL's master name moves to the transport options)."""
    text = str(e)
    for url in (ctx.broker_url, redis_url.for_celery(ctx.broker_url)[0]):
        text = text.replace(url, masked(url))
    return text


SERVABLE_CACHE_S = 1.0


def _check_servable(ctx: FarmContext, request: Request, wait_for_worker: float) -> None:
    """Raise unless the model is known, the request fits it, and a live worker serves it."""
    try:
        n_ctx = _served_context(ctx, request.model, wait_for_worker)
    except NoLiveWorker:
        _check_embeddable(ctx, request)  # a model that serves no embeddings is a 400 first
        raise
    _check_fits(request, request.model, n_ctx)
    _check_embeddable(ctx, request)


def _served_context(ctx: FarmContext, model: str, wait_for_worker: float) -> int:
    """The model's context size; UnknownModel, or NoLiveWorker when no live worker serves it.

    A model seen served is trusted for SERVABLE_CACHE_S, which keeps two registry reads
    off every submit in a burst; a job that still finds no worker expires from its queue.
    """
    cached = ctx.servable.get(model)
    if cached is not None and cached[0] > time.monotonic():
        return cached[1]
    deadline = time.monotonic() + wait_for_worker
    while True:
        with transaction(ctx.database_url) as s:
            record = queries.get_model(s, model)
            ctx.embeds[model] = (record.embedding, tuple(record.dimensions or ()))
            if queries.live_leases(s, model):
                ctx.servable[model] = (time.monotonic() + SERVABLE_CACHE_S, record.n_ctx)
                return record.n_ctx
        if time.monotonic() >= deadline:
            _check_broker(ctx)
            raise NoLiveWorker(
                f"no worker is serving model '{model}'; start one with "
                f"`farm worker --model {model}` (or `farm up --model {model}`), or pass "
                "--wait-for-worker SECONDS to wait for one"
            )
        time.sleep(0.25)


def _check_broker(ctx: FarmContext) -> None:
    """FarmUnavailable when the broker cannot be reached. Workers that lose the broker stop
    renewing their leases, so a farm whose Redis is down looks like one with no worker: say
    what is wrong instead of sending the caller to start one."""
    try:
        with ctx.app.connection_for_write() as conn:
            conn.ensure_connection(max_retries=0)  # one attempt: refused at once when down
    except (KombuError, OSError) as e:
        raise _unreachable(ctx, e) from e


# No tokenizer's token spans more bytes than this on average over a prompt: a prompt
# longer than n_ctx times it cannot fit the context, and is refused before it is queued,
# carried through Redis and tokenised by a worker (a 20 MB prompt took 92 s to fail there).
MAX_BYTES_PER_TOKEN = 64


def _check_embeddable(ctx: FarmContext, request: Request) -> None:
    """An embeddings request needs a model that serves embeddings, and `dimensions` it
    allows (read with the model's context size by `_served_context`)."""
    if request.input is None:
        return
    embedding, dimensions = ctx.embeds.get(request.model, (False, ()))
    if not embedding:
        raise InvalidRequest(
            f"invalid 'model': model '{request.model}' does not serve embeddings; register "
            "one with `embedding = true` in the models file (or `farm models add --embedding`)"
        )
    if request.dimensions is not None and request.dimensions not in dimensions:
        allowed = ", ".join(map(str, dimensions)) if dimensions else "none: leave it out"
        raise InvalidRequest(
            f"invalid 'dimensions': model '{request.model}' does not allow {request.dimensions} "
            f"dimensions (allowed: {allowed})"
        )


def _check_fits(request: Request, model: str, n_ctx: int) -> None:
    if request.input is not None:
        for i, item in enumerate(request.input):
            size = len(item) if isinstance(item, tuple) else len(item.encode())
            if size > n_ctx * (1 if isinstance(item, tuple) else MAX_BYTES_PER_TOKEN):
                unit = "tokens" if isinstance(item, tuple) else "bytes"
                raise InvalidRequest(
                    f"invalid 'input': input {i} ({size:,} {unit}) cannot fit model "
                    f"'{model}' (context {n_ctx} tokens)"
                )
        return
    size = request.input_size
    if size > n_ctx * MAX_BYTES_PER_TOKEN:
        field = "messages" if request.is_chat else "prompt"
        raise InvalidRequest(
            f"invalid '{field}': {size:,} bytes cannot fit model '{model}' (context "
            f"{n_ctx} tokens, at most about {n_ctx * MAX_BYTES_PER_TOKEN:,} bytes of text); "
            "shorten it or use a model with a longer context"
        )
    if request.stopping.max_tokens > n_ctx:
        raise InvalidRequest(
            f"invalid 'stopping.max_tokens': {request.stopping.max_tokens} is more than "
            f"model '{model}' can hold (context {n_ctx} tokens)"
        )


def _argsrepr(request: Request, ctx: FarmContext) -> str:
    if ctx.settings.log_prompts:
        return repr(request.to_wire())
    if request.input is not None:
        return f"(embeddings of {len(request.input)} inputs, session={request.session!r})"
    size = sum(len(p) for p in request.prompts) + sum(
        len(m.content) for m in request.messages or ()
    )
    kind = "chat" if request.is_chat else "prompt"
    return f"({kind} of {size} chars, session={request.session!r})"


def build(prompt: str | None, **fields: Any) -> Request:
    """A Request from `farm.infer`/`farm.submit` style arguments (flat or nested)."""
    data = {k: v for k, v in fields.items() if v is not None}
    if prompt is not None:
        data["prompt"] = prompt
    return make_request(data)
