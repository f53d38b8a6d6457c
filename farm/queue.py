"""Queues, priorities and Redis keys: the one place that names them.

Nothing else in farm builds a queue name or a Redis key by string formatting. The Celery
app that uses these names, and its transport options, are in `broker.py`.

Priorities on the Redis transport: each queue is ten Redis lists, one per priority step,
and the worker pops from the lowest number first, so **0 is the highest priority** (the
reverse of RabbitMQ). The named priorities map onto those steps here and nowhere else.
A message sent with no priority gets `DEFAULT_PRIORITY` (normal) from `route_job`, a Celery
router; kombu would otherwise file it under 0 and let it jump the queue. (Celery's
`task_default_priority` covers `apply_async` only, not `send_task` by name.)

The transport options must be the same in clients, workers and Flower: a producer with
ten steps and a consumer with kombu's default four would strand messages for good. They
are built by `broker.transport_options()` from PRIORITY_STEPS here, and every Celery app
farm makes uses it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from farm.request import Priority

# -- priorities -------------------------------------------------------------------------
PRIORITY_STEPS: list[int] = list(range(10))
PRIORITIES: dict[str, int] = {"high": 0, "normal": 5, "low": 8}
DEFAULT_PRIORITY = PRIORITIES["normal"]
# Batch lines at low priority: behind every interactive job, low ones included, and never
# aged up (admission/aging.py moves the named priorities' jobs only). A batch's bound is
# its completion window; the feeder keeps few of its lines queued at a time.
BATCH_LOW = 9


def priority_number(priority: Priority, *, batch: bool = False) -> int:
    """The broker's number for a named priority (0 is served first)."""
    return BATCH_LOW if batch and priority == "low" else PRIORITIES[priority]


def priority_name(number: int) -> str:
    """The named priority nearest to a broker number, for display."""
    return min(PRIORITIES, key=lambda name: abs(PRIORITIES[name] - number))


# -- names ----------------------------------------------------------------------------
TASK_NAME = "farm.generate"
QUEUE_PREFIX = "farm.model."
KEY_PREFIX = "farm:"


def queue_name(model: str) -> str:
    """The Celery queue a model's jobs go to. Model names never contain the transport's sep."""
    return f"{QUEUE_PREFIX}{model}"


def priority_list_key(model: str, step: int) -> str:
    """The Redis list holding a model's queued jobs at one priority step (kombu's layout)."""
    # kombu's Redis transport names the list `<queue>` for step 0 and `<queue><sep><step>`
    # otherwise, with sep = "\x06\x16" (its default, which farm keeps).
    return queue_name(model) if step == 0 else f"{queue_name(model)}\x06\x16{step}"


def keys_version_key() -> str:
    """A token that `farm keys revoke` changes: gateways drop the keys they cached when it
    does (farm/gateway/keys.py)."""
    return f"{KEY_PREFIX}keys:version"


def stream_key(job_id: str) -> str:
    """The Redis stream a job's tokens and final event are written to."""
    return f"{KEY_PREFIX}job:{job_id}:stream"


def progress_key(job_id: str) -> str:
    """Tokens a running job has generated so far, refreshed by its worker a few times a second."""
    return f"{KEY_PREFIX}job:{job_id}:tokens"


def rejections_key(model: str, reason: str) -> str:
    """How many submits for a model were refused for `reason` (for the metrics)."""
    return f"{KEY_PREFIX}rejected:{model}:{reason}"


def quota_used_key(session: str, day: str) -> str:
    """Tokens a session's jobs used on a (UTC) day, settled as they end."""
    return f"{KEY_PREFIX}quota:{session}:{day}:used"


def quota_reserved_key(session: str, day: str) -> str:
    """Tokens reserved by a session's jobs submitted that day and not ended yet."""
    return f"{KEY_PREFIX}quota:{session}:{day}:reserved"


def quota_active_key(session: str) -> str:
    """A session's jobs queued or running."""
    return f"{KEY_PREFIX}quota:{session}:active"


def rate_key(session: str, kind: str) -> str:
    """A session's sliding minute of submits: `kind` requests or tokens (a sorted set of
    job ids, or job id:tokens, scored by submit time in ms)."""
    return f"{KEY_PREFIX}rate:{session}:{kind}"


def quota_job_key(job_id: str) -> str:
    """A job's reservation (session, day, tokens) until it is settled, once."""
    return f"{KEY_PREFIX}job:{job_id}:quota"


def run_key(job_id: str) -> str:
    """Held by the one run of a job in the fleet (its worker's token), renewed while it
    runs: a second delivery of the job waits for it instead of running the job again, and a
    run that lost it (its worker cut off) writes nothing more on the job's stream."""
    return f"{KEY_PREFIX}job:{job_id}:run"


def written_key(job_id: str) -> str:
    """The number of the last event each run of a job wrote on its stream (a hash by the
    run's token): a write sent again after a lost reply is not written twice."""
    return f"{KEY_PREFIX}job:{job_id}:written"


def cancel_key(job_id: str) -> str:
    """Set when a job is cancelled; the worker checks it before and between tokens."""
    return f"{KEY_PREFIX}job:{job_id}:cancel"


# -- fair share (farm/fair/): jobs held per session until dispatched to the Celery queue --
FAIR_HEADER = "farm_fair"  # the message header naming a job's session and charge


def fair_level_key(model: str, step: int, part: str) -> str:
    """One of a model's priority step's fair-share keys: `backlog` (a sorted set: sessions
    with held jobs, by served tokens), `served` (a hash: every session's served tokens) and
    `floor` (the served tokens of the session dispatched last)."""
    return f"{KEY_PREFIX}fair:{model}:{step}:{part}"


def fair_held_key(model: str, step: int, session: str) -> str:
    """A session's jobs held at one priority step of a model, oldest first (job ids)."""
    return fair_level_key(model, step, f"held:{session}")


def fair_jobs_key(model: str) -> str:
    """A model's held jobs: job id -> 'session TAB step TAB charge TAB submitted'."""
    return f"{KEY_PREFIX}fair:{model}:jobs"


def fair_messages_key(model: str) -> str:
    """A model's held jobs: job id -> the Celery message, as kombu would have queued it."""
    return f"{KEY_PREFIX}fair:{model}:messages"


def fair_charged_key(model: str) -> str:
    """A model's dispatched jobs not yet settled: job id -> what its session was charged."""
    return f"{KEY_PREFIX}fair:{model}:charged"


def fair_cap_key(model: str) -> str:
    """Jobs of each priority step kept waiting in the model's Celery queue (a quarter of its
    live slots, or FARM_FAIR_QUEUED), written by its workers' heartbeats; none: no holding."""
    return f"{KEY_PREFIX}fair:{model}:cap"


# The broker's history (farm/failover.py): the replication id of the Redis that the registry
# was last reconciled with, and the lock of the one worker reconciling it now.
BROKER_EPOCH_KEY = f"{KEY_PREFIX}broker:epoch"
BROKER_RECONCILE_LOCK = f"{KEY_PREFIX}broker:reconciling"

BATCH_FEEDER_LOCK = f"{KEY_PREFIX}batches:feeder"  # held by the feeder making a pass


def batch_cancelled_key(batch_id: str) -> str:
    """The jobs of a cancelling batch that the feeder has cancelled already."""
    return f"{KEY_PREFIX}batches:cancelled:{batch_id}"


# How long a publish may retry before the client reports the broker as unreachable.
PUBLISH_RETRY = {"max_retries": 2, "interval_start": 0, "interval_step": 0.5, "interval_max": 1}
