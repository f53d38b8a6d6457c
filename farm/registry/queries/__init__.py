"""Named reads and writes on the registry, one module per noun: `models` (the LLMs farm
serves), `workers` (workers and their leases), `usage` (one row per job), `quotas` (limits
per session), `keys` (the gateway's API keys, used as a module: `keys.counts`), `responses`
(the gateway's stored responses, used as a module: `responses.get`). Batches and files
are in `farm/batches/store.py`. Every function takes the caller's session; none commits.

Callers use `queries.NAME`; the names are gathered here so that a query can move between
the noun modules without touching its callers.
"""

from farm.registry.queries.models import add_model, get_model, list_models, remove_model
from farm.registry.queries.quotas import get_quota, list_quotas, remove_quota, set_quota
from farm.registry.queries.usage import (
    UsageTotal,
    cancel_if_queued,
    expire_queued,
    expire_stale_queued,
    finish_batch_line,
    get_usage,
    histogram,
    job_counts,
    queued_jobs,
    recent_generation_ms,
    recent_jobs,
    record_ended,
    record_finished,
    record_queued,
    record_queued_many,
    record_started,
    served_since,
    token_totals,
    usage_totals,
)
from farm.registry.queries.workers import (
    LeaseSpec,
    claim_lost_workers,
    device_users,
    get_worker,
    heartbeat,
    list_workers,
    live_leases,
    mark_worker_lost,
    register_worker,
    release_worker,
    requeued,
    running_jobs,
    set_leases,
    set_worker_device,
    unclaim_lost_worker,
)

__all__ = [
    "LeaseSpec",
    "UsageTotal",
    "add_model",
    "cancel_if_queued",
    "claim_lost_workers",
    "device_users",
    "expire_queued",
    "expire_stale_queued",
    "finish_batch_line",
    "get_model",
    "get_quota",
    "get_usage",
    "get_worker",
    "heartbeat",
    "histogram",
    "job_counts",
    "list_models",
    "list_quotas",
    "list_workers",
    "live_leases",
    "mark_worker_lost",
    "queued_jobs",
    "recent_generation_ms",
    "recent_jobs",
    "record_ended",
    "record_finished",
    "record_queued",
    "record_queued_many",
    "record_started",
    "register_worker",
    "release_worker",
    "remove_model",
    "remove_quota",
    "requeued",
    "running_jobs",
    "served_since",
    "set_leases",
    "set_quota",
    "set_worker_device",
    "token_totals",
    "unclaim_lost_worker",
    "usage_totals",
]
