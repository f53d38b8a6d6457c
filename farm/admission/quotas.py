"""Quotas: a session's tokens per day and jobs in flight, reserved before a job is queued.

    submit:  up to (the prompts' UTF-8 bytes + 16 per message) + max_tokens x choices are
             reserved, and one job counted in flight, in one Redis script: either the
             whole reservation fits under the session's limits or nothing is taken
    end:     the worker (or a cancel, or the expiry of a lost job) settles the job's
             reservation once (GETDEL of its key): reserved goes down by what was
             reserved, used up by what the job really used, in flight down by one

A job never uses more than it reserved (a token is at least one byte, and the reply at
most max_tokens), so the tokens used in a day never pass the limit: concurrent submitters
cannot overshoot it. The day is UTC's; its counters expire a day after it ends. Limits
live in the registry (`farm quota set`), cached for a second by each client.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from farm.context import FarmContext
from farm.errors import FarmUnavailable, QuotaExceeded
from farm.queue import (
    quota_active_key,
    quota_job_key,
    quota_reserved_key,
    quota_used_key,
    rejections_key,
)
from farm.registry import queries, transaction
from farm.request import Request

LIMITS_CACHE_S = 1.0
PER_MESSAGE = 16  # template tokens a chat message may add around its text

_RESERVE = """
local used = tonumber(redis.call('GET', KEYS[1]) or '0')
local reserved = tonumber(redis.call('GET', KEYS[2]) or '0')
local active = tonumber(redis.call('GET', KEYS[3]) or '0')
local amount = tonumber(ARGV[1])
local limit = tonumber(ARGV[2])
local most = tonumber(ARGV[3])
if limit >= 0 and used + reserved + amount > limit then
  return {0, used, reserved, active}
end
if most >= 0 and active + 1 > most then
  return {-1, used, reserved, active}
end
redis.call('INCRBY', KEYS[2], amount)
redis.call('EXPIRE', KEYS[2], ARGV[5])
redis.call('INCR', KEYS[3])
redis.call('SET', KEYS[4], ARGV[4], 'EX', ARGV[6])
return {1, used, reserved, active}
"""


@dataclass(frozen=True)
class Limits:
    tokens_per_day: int | None
    max_queued: int | None


def day_of(now: datetime | None = None) -> str:
    return (now or datetime.now(UTC)).strftime("%Y-%m-%d")


def resets_at(now: datetime | None = None) -> datetime:
    now = now or datetime.now(UTC)
    return datetime(now.year, now.month, now.day, tzinfo=UTC) + timedelta(days=1)


def reservation(request: Request) -> int:
    """The most tokens the job can use: its prompts' bytes (at least one per token; each
    prompt counted once however many sequences share it), what a chat template adds, and
    max_tokens for every sequence (prompts x n)."""
    if request.messages is not None:
        prompt = sum(len(m.content.encode()) + PER_MESSAGE for m in request.messages)
    else:
        prompt = sum(len(p.encode()) + PER_MESSAGE for p in request.prompts)
    return prompt + request.stopping.max_tokens * request.choices


def limits(ctx: FarmContext, session: str) -> Limits | None:
    """The session's limits (None: unlimited), read from the registry at most once a second."""
    cached = ctx.quotas.get(session)
    now = time.monotonic()
    if cached is not None and cached[0] > now:
        return cached[1]  # type: ignore[return-value]
    with transaction(ctx.database_url) as s:
        row = queries.get_quota(s, session)
        found = None if row is None else Limits(row.tokens_per_day, row.max_queued)
    ctx.quotas[session] = (now + LIMITS_CACHE_S, found)
    return found


def reserve(ctx: FarmContext, job_id: str, request: Request) -> None:
    """Reserve the job's tokens and its place in flight, or raise QuotaExceeded (nothing
    taken). FarmUnavailable when Redis cannot be reached: nothing is taken either."""
    found = limits(ctx, request.session)
    if found is None:
        return
    import redis

    day, amount = day_of(), reservation(request)
    day_ttl = 2 * 24 * 3600
    job_ttl = ctx.settings.job_expires + ctx.settings.job_time_limit + 3600
    keys = [
        quota_used_key(request.session, day),
        quota_reserved_key(request.session, day),
        quota_active_key(request.session),
        quota_job_key(job_id),
    ]
    args: list[Any] = [
        amount,
        -1 if found.tokens_per_day is None else found.tokens_per_day,
        -1 if found.max_queued is None else found.max_queued,
        f"{request.session}\n{day}\n{amount}",
        day_ttl,
        job_ttl,
    ]
    try:
        script: Any = ctx.redis.register_script(_RESERVE)
        ok, used, reserved, active = script(keys=keys, args=args)
    except redis.RedisError as e:
        raise FarmUnavailable(f"cannot reserve quota in Redis: {e}; nothing was queued") from e
    if ok == 1:
        return
    _count_rejection(ctx, request.model)
    if ok == 0:
        reset = resets_at()
        hours, rest = divmod(int((reset - datetime.now(UTC)).total_seconds()), 3600)
        raise QuotaExceeded(
            f"session '{request.session}' is over its quota of {found.tokens_per_day} tokens a "
            f"day: {used} used and {reserved} reserved today, and this job may use up to "
            f"{amount} (prompt and max_tokens); nothing was queued. It resets at 00:00 UTC, "
            f"in {hours} h {rest // 60} min"
        )
    raise QuotaExceeded(
        f"session '{request.session}' has {active} jobs queued or running, its limit "
        f"(max queued {found.max_queued}); nothing was queued: wait for some to finish"
    )


def settle(ctx: FarmContext, job_id: str, used_tokens: int) -> bool:
    """End the job's reservation once: True when this call settled it."""
    r: Any = ctx.redis
    raw = r.getdel(quota_job_key(job_id))
    if raw is None:
        return False
    session, day, amount = str(raw).split("\n")
    pipe = r.pipeline(transaction=True)
    pipe.decrby(quota_reserved_key(session, day), int(amount))
    pipe.incrby(quota_used_key(session, day), max(0, int(used_tokens)))
    pipe.expire(quota_used_key(session, day), 2 * 24 * 3600)
    pipe.decr(quota_active_key(session))
    pipe.execute()
    return True


def standing(ctx: FarmContext, session: str) -> dict[str, int]:
    """Used and reserved tokens today, and jobs in flight, for `farm quota list`."""
    day = day_of()
    pipe = ctx.redis.pipeline(transaction=False)
    pipe.get(quota_used_key(session, day))
    pipe.get(quota_reserved_key(session, day))
    pipe.get(quota_active_key(session))
    used, reserved, active = (int(v or 0) for v in pipe.execute())
    return {"used_today": used, "reserved": reserved, "in_flight": active}


def _count_rejection(ctx: FarmContext, model: str) -> None:
    with contextlib.suppress(Exception):  # a metric only
        ctx.redis.incr(rejections_key(model, "quota"))
