"""Quotas and rate limits: a session's tokens per day and jobs in flight, and its requests
and tokens per minute, all checked and taken before a job is queued, in one Redis script:
either the job fits under every limit of its session or nothing is taken.

    submit:  up to (the prompts' UTF-8 bytes + 16 per message) + max_tokens x choices
             are reserved, and one job counted in flight; with a rate limit, the submit is
             also logged in the session's sliding minute (its request, and its estimated
             tokens: about 4 characters a prompt token, plus max_tokens, as OpenAI counts
             them against a tokens-per-minute limit)
    end:     the worker (or a cancel, or the expiry of a lost job) settles the job's
             reservation once (GETDEL of its key): reserved goes down by what was
             reserved, used up by what the job really used, in flight down by one

A job never uses more than it reserved (a token is at least one byte, and the reply at
most max_tokens), so the tokens used in a day never pass the limit: concurrent submitters
cannot overshoot it, nor a rate limit. The day is UTC's; its counters expire a day after it
ends. A refused rate gets RateLimited with the seconds until the job would fit. Limits
live in the registry (`farm quota set`), cached for a second by each client.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from farm.config import masked
from farm.context import FarmContext
from farm.errors import FarmUnavailable, QuotaExceeded, RateLimited
from farm.queue import (
    quota_active_key,
    quota_job_key,
    quota_reserved_key,
    quota_used_key,
    rate_key,
    rejections_key,
)
from farm.registry import queries, transaction
from farm.request import Request

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

LIMITS_CACHE_S = 1.0
PER_MESSAGE = 16  # template tokens a chat message may add around its text

_RESERVE = """
local amount = tonumber(ARGV[1])
local limit = tonumber(ARGV[2])
local most = tonumber(ARGV[3])
local now, window = tonumber(ARGV[7]), tonumber(ARGV[8])
local rpm, tpm, estimate = tonumber(ARGV[9]), tonumber(ARGV[10]), tonumber(ARGV[11])
local requests, tokens = 0, 0
local request_reset, token_reset = 0, 0
if rpm >= 0 or tpm >= 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[5], '-inf', now - window)
  redis.call('ZREMRANGEBYSCORE', KEYS[6], '-inf', now - window)
  requests = redis.call('ZCARD', KEYS[5])
  local oldest = redis.call('ZRANGE', KEYS[5], 0, 0, 'WITHSCORES')
  if oldest[2] then request_reset = tonumber(oldest[2]) + window - now end
  if rpm >= 0 and requests + 1 > rpm then
    return {-2, requests, tokens, request_reset}
  end
  local logged = redis.call('ZRANGE', KEYS[6], 0, -1, 'WITHSCORES')
  for i = 1, #logged, 2 do
    tokens = tokens + tonumber(string.match(logged[i], ':(%d+)$'))
  end
  if #logged > 0 then token_reset = tonumber(logged[2]) + window - now end
  if tpm >= 0 and tokens + estimate > tpm then
    -- when enough of the minute's tokens will have aged out for this job to fit
    local left, wait = tokens, -1
    for i = 1, #logged, 2 do
      left = left - tonumber(string.match(logged[i], ':(%d+)$'))
      if left + estimate <= tpm then wait = tonumber(logged[i + 1]) + window - now break end
    end
    return {-3, requests, tokens, wait}
  end
end
local used = tonumber(redis.call('GET', KEYS[1]) or '0')
local reserved = tonumber(redis.call('GET', KEYS[2]) or '0')
local active = tonumber(redis.call('GET', KEYS[3]) or '0')
if limit >= 0 and used + reserved + amount > limit then
  return {0, used, reserved, active}
end
if most >= 0 and active + 1 > most then
  return {-1, used, reserved, active}
end
if limit >= 0 or most >= 0 then
  redis.call('INCRBY', KEYS[2], amount)
  redis.call('EXPIRE', KEYS[2], ARGV[5])
  redis.call('INCR', KEYS[3])
  redis.call('SET', KEYS[4], ARGV[4], 'EX', ARGV[6])
end
if rpm >= 0 or tpm >= 0 then
  redis.call('ZADD', KEYS[5], now, ARGV[12])
  redis.call('ZADD', KEYS[6], now, ARGV[12] .. ':' .. estimate)
  redis.call('PEXPIRE', KEYS[5], window)
  redis.call('PEXPIRE', KEYS[6], window)
  if request_reset == 0 then request_reset = window end
  if token_reset == 0 then token_reset = window end
end
return {1, requests + 1, tokens + estimate, request_reset, token_reset}
"""
WINDOW_MS = 60_000  # a rate limit's sliding window: one minute


@dataclass(frozen=True)
class Limits:
    tokens_per_day: int | None
    max_queued: int | None
    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    weight: float = 1.0  # fair share: not a limit, so never a reason to reserve

    @property
    def quota(self) -> bool:
        return self.tokens_per_day is not None or self.max_queued is not None

    @property
    def rate(self) -> bool:
        return self.requests_per_minute is not None or self.tokens_per_minute is not None


@dataclass(frozen=True)
class RateState:
    """Where a session stands in its minute, as OpenAI's x-ratelimit-* headers say it:
    limits (None: none), what remains after this request, and seconds until each resets."""

    requests_limit: int | None
    requests_remaining: int | None
    requests_reset_s: float
    tokens_limit: int | None
    tokens_remaining: int | None
    tokens_reset_s: float

    def headers(self) -> dict[str, str]:
        found: dict[str, str] = {}
        for kind in ("requests", "tokens"):
            limit = getattr(self, f"{kind}_limit")
            if limit is None:
                continue
            found[f"x-ratelimit-limit-{kind}"] = str(limit)
            found[f"x-ratelimit-remaining-{kind}"] = str(getattr(self, f"{kind}_remaining"))
            found[f"x-ratelimit-reset-{kind}"] = f"{getattr(self, f'{kind}_reset_s'):.3f}s"
        return found


def day_of(now: datetime | None = None) -> str:
    return (now or datetime.now(UTC)).strftime("%Y-%m-%d")


def resets_at(now: datetime | None = None) -> datetime:
    now = now or datetime.now(UTC)
    return datetime(now.year, now.month, now.day, tzinfo=UTC) + timedelta(days=1)


def rate_estimate(request: Request) -> int:
    """The tokens a job counts against a tokens-per-minute limit: its prompts at about four
    characters a token (OpenAI's rule of thumb) and max_tokens for every choice."""
    if request.messages is not None:
        chars = sum(m.size() for m in request.messages) + 4 * len(request.messages)
        chars += request.tools_size
    else:
        chars = sum(len(p) for p in request.prompts)
    return -(-chars // 4) + request.stopping.max_tokens * request.choices


def reservation(request: Request) -> int:
    """The most tokens the job can use: its prompts' bytes (at least one per token; each
    prompt counted once however many sequences share it; tools and calls as JSON included),
    what a chat template adds, and max_tokens for every sequence (prompts x n)."""
    if request.input is not None:  # embeddings generate nothing: their inputs' tokens
        return sum(
            len(item) if isinstance(item, tuple) else len(item.encode()) + PER_MESSAGE
            for item in request.input
        )
    if request.messages is not None:
        prompt = sum(m.size() + PER_MESSAGE for m in request.messages) + request.tools_size
    else:
        prompt = sum(len(p.encode()) + PER_MESSAGE for p in request.prompts)
    return prompt + request.stopping.max_tokens * request.choices


def limits(ctx: FarmContext, session: str, s: Session | None = None) -> Limits | None:
    """The session's limits (None: unlimited), read from the registry at most once a second:
    in `s` when the caller holds a transaction (never a second connection inside one)."""
    cached = ctx.quotas.get(session)
    now = time.monotonic()
    if cached is not None and cached[0] > now:
        return cached[1]  # type: ignore[return-value]
    if s is None:
        with transaction(ctx.database_url) as fresh:
            found = _limits_of(fresh, session)
    else:
        found = _limits_of(s, session)
    ctx.quotas[session] = (now + LIMITS_CACHE_S, found)
    return found


def _limits_of(s: Session, session: str) -> Limits | None:
    row = queries.get_quota(s, session)
    if row is None:
        return None
    return Limits(
        row.tokens_per_day,
        row.max_queued,
        row.requests_per_minute,
        row.tokens_per_minute,
        row.weight or 1.0,
    )


def reserve(
    ctx: FarmContext, job_id: str, request: Request, *, rate: bool = True
) -> RateState | None:
    """Reserve the job's tokens and its place in flight and log it in its session's minute,
    or raise QuotaExceeded / RateLimited (nothing taken). `rate=False` (batch lines, which
    have a level of their own) leaves the rate limits out. Returns the session's rate state
    when it has a rate limit. FarmUnavailable when Redis cannot be reached: nothing taken."""
    found = limits(ctx, request.session)
    if found is None or not (found.quota or (rate and found.rate)):
        return None
    import redis

    rpm = found.requests_per_minute if rate else None
    tpm = found.tokens_per_minute if rate else None
    day, amount, estimate = day_of(), reservation(request), rate_estimate(request)
    day_ttl = 2 * 24 * 3600
    job_ttl = ctx.settings.job_expires + ctx.settings.job_time_limit + 3600
    keys = [
        quota_used_key(request.session, day),
        quota_reserved_key(request.session, day),
        quota_active_key(request.session),
        quota_job_key(job_id),
        rate_key(request.session, "requests"),
        rate_key(request.session, "tokens"),
    ]
    args: list[Any] = [
        amount,
        -1 if found.tokens_per_day is None else found.tokens_per_day,
        -1 if found.max_queued is None else found.max_queued,
        f"{request.session}\n{day}\n{amount}",
        day_ttl,
        job_ttl,
        int(time.time() * 1000),
        WINDOW_MS,
        -1 if rpm is None else rpm,
        -1 if tpm is None else tpm,
        estimate,
        job_id,
    ]
    try:
        script: Any = ctx.redis.register_script(_RESERVE)
        ok, *rest = script(keys=keys, args=args)
    except redis.RedisError as e:
        raise FarmUnavailable(
            f"cannot reach the farm's Redis at {masked(ctx.result_url)} to reserve the quota "
            f"of session '{request.session}': {e}; nothing was queued: is `farm up` running, or "
            "are FARM_BROKER_URL (and FARM_RESULT_URL) right?"
        ) from e
    if ok == 1:
        requests, tokens, request_reset, token_reset = rest
        if rpm is None and tpm is None:
            return None
        return RateState(
            rpm,
            None if rpm is None else max(0, rpm - requests),
            request_reset / 1000,
            tpm,
            None if tpm is None else max(0, tpm - tokens),
            token_reset / 1000,
        )
    _count_rejection(ctx, request.model, "rate" if ok in (-2, -3) else "quota")
    if ok in (-2, -3):
        requests, tokens, wait_ms = rest
        if ok == -3 and wait_ms < 0:  # more than the whole minute allows
            raise RateLimited(
                f"this job counts about {estimate} tokens (its prompt and max_tokens), over "
                f"session '{request.session}''s limit of {tpm} tokens a minute on its own: "
                "lower max_tokens or shorten the prompt; nothing was queued",
                retry_after=0.0,
            )
        wait = max(0.001, wait_ms / 1000)
        state = RateState(
            rpm, 0 if ok == -2 else None if rpm is None else max(0, rpm - requests), wait,
            tpm, None if tpm is None else max(0, tpm - tokens), wait,
        )  # fmt: skip
        what = (
            f"{rpm} requests a minute ({requests} in the last minute)"
            if ok == -2
            else f"{tpm} tokens a minute ({tokens} in the last minute, and this job counts "
            f"about {estimate})"
        )
        raise RateLimited(
            f"session '{request.session}' is over its rate limit of {what}; nothing was "
            f"queued: retry in {wait:.1f} s",
            retry_after=wait,
            limits=state,
        )
    used, reserved, active = rest
    if ok == 0:
        reset = resets_at()
        hours, remainder = divmod(int((reset - datetime.now(UTC)).total_seconds()), 3600)
        raise QuotaExceeded(
            f"session '{request.session}' is over its quota of {found.tokens_per_day} tokens a "
            f"day: {used} used and {reserved} reserved today, and this job may use up to "
            f"{amount} (prompt and max_tokens); nothing was queued. It resets at 00:00 UTC, "
            f"in {hours} h {remainder // 60} min"
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


def _count_rejection(ctx: FarmContext, model: str, reason: str) -> None:
    with contextlib.suppress(Exception):  # a metric only
        ctx.redis.incr(rejections_key(model, reason))
