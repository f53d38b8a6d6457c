"""Bounded waits: a job that waited past its priority's limit moves up one priority.

Strict priority starves: a steady stream of high jobs would keep a low one waiting for
ever. Every worker's heartbeat looks at the oldest job of each named priority below high
(the right end of kombu's Redis list for that step) and, when it has waited longer than
FARM_MAX_WAIT_LOW / FARM_MAX_WAIT_NORMAL, moves it to the front of the next priority's
list in one Redis script (a job is moved once, whichever worker sees it first), where it
runs at the next free slot: it has waited longer than anything there. Its wait counts
from its submit, so a low job that aged into normal moves on to high at once (with the
defaults, 600 s and 120 s): no job waits much longer than FARM_MAX_WAIT_LOW plus a
heartbeat and the other aged jobs ahead of it.
The age comes from the message's own `expires` header (submit time + FARM_JOB_EXPIRES).
Jobs still held for their fair turn (farm/fair/) age the same way: one that waited too long
is dispatched at once to the front of the next priority's list.
"""

from __future__ import annotations

import json
import logging
import time
from datetime import UTC, datetime
from typing import Any

from farm.context import FarmContext
from farm.fair import held
from farm.queue import PRIORITIES, priority_list_key

log = logging.getLogger(__name__)

AGES_INTO = {"low": "normal", "normal": "high"}
MOST_MOVES = 100  # per list and round: a backlog ages over a few heartbeats, never in one burst

# Move the list's oldest message (its right end, which BRPOP takes next) to the right end
# of another list, if it is still the one the caller looked at.
_MOVE = """
local tail = redis.call('LINDEX', KEYS[1], -1)
if tail and tail == ARGV[1] then
  redis.call('RPOP', KEYS[1])
  redis.call('RPUSH', KEYS[2], tail)
  return 1
end
return 0
"""


def waited(raw: bytes | str, job_expires: float, now: datetime) -> float | None:
    """Seconds since the message was submitted, from its expires header; None if unknown."""
    try:
        expires = json.loads(raw)["headers"].get("expires")
        at = datetime.fromisoformat(expires)
    except (ValueError, KeyError, TypeError, AttributeError):
        return None
    at = at if at.tzinfo else at.replace(tzinfo=UTC)
    return job_expires - (at - now).total_seconds()


def age_queues(ctx: FarmContext, models: list[str]) -> int:
    """Move every job that waited too long up one priority; returns how many moved."""
    settings = ctx.settings
    limits = {"low": settings.max_wait_low, "normal": settings.max_wait_normal}
    r: Any = ctx.broker_redis
    move = r.register_script(_MOVE)
    moved = 0
    for model in models:
        for name, limit in limits.items():
            if not limit:
                continue
            step, into = PRIORITIES[name], PRIORITIES[AGES_INTO[name]]
            lifted = held.age(r, model, step, into, time.time() - limit, MOST_MOVES)
            if lifted:
                moved += lifted
                log.info(
                    "%d held %s jobs for %s waited over %.0fs: moved up", lifted, name, model, limit
                )
            src = priority_list_key(model, step)
            dst = priority_list_key(model, into)
            for _ in range(MOST_MOVES):
                raw = r.lindex(src, -1)
                if raw is None:
                    break
                age = waited(raw, settings.job_expires, datetime.now(UTC))
                if age is None or age < limit:
                    break  # the oldest has not waited long enough: the rest are younger
                if move(keys=[src, dst], args=[raw]):
                    moved += 1
                    log.info(
                        "a %s job for %s waited %.0fs: moved up to %s",
                        name,
                        model,
                        age,
                        AGES_INTO[name],
                    )
    return moved
