"""Held jobs in Redis: holding a job under its session, dispatching the least served
session's next job into the Celery queue, settling a job's charge, withdrawing a cancelled
one, and aging held jobs. Each operation is one Redis script, atomic on the broker's Redis.

Per model and priority step (keys in farm/queue.py):
    held:<session>  list of job ids, oldest first
    backlog         sorted set: sessions with held jobs, scored by their served tokens
    served          hash: every session's served tokens (weighted, see farm/fair/__init__)
    floor           served tokens of the session dispatched last (a newcomer's lower bound)
Per model: jobs (id -> session, step, charge, submitted, weight), messages (id -> kombu's
message), charged (id -> what a dispatched job was charged, until it ends), cap.
"""

from __future__ import annotations

import hashlib
import math
from functools import cache
from typing import Any

from farm.queue import (
    FAIR_HEADER,
    PRIORITY_STEPS,
    fair_cap_key,
    fair_charged_key,
    fair_held_key,
    fair_jobs_key,
    fair_level_key,
    fair_messages_key,
    priority_list_key,
)
from farm.request import Request

CHARS_PER_TOKEN = 4  # a prompt's tokens before it is tokenised (OpenAI's rule of thumb)
MOST_PER_CALL = 1000  # dispatches per script call: Redis runs nothing else meanwhile

# Helpers every script starts with. take(): a held job leaves its session's list: its
# message is returned for the caller to queue, its meta kept as its charge, and its session
# charged. settle_backlog(): the session stays in the backlog (with its new score) only
# while it holds jobs.
_PRELUDE = """
local function field(meta, n)
  local i = 0
  for part in string.gmatch(meta .. '\\t', '([^\\t]*)\\t') do
    i = i + 1
    if i == n then return part end
  end
end
local function take(job, session, served, floor, jobs, msgs, charged)
  local meta = redis.call('HGET', jobs, job)
  local raw = redis.call('HGET', msgs, job)
  redis.call('HDEL', jobs, job)
  redis.call('HDEL', msgs, job)
  if not meta then return raw end
  redis.call('HSET', charged, job, meta)
  redis.call('SET', floor, redis.call('HGET', served, session) or '0')
  redis.call('HINCRBYFLOAT', served, session, tonumber(field(meta, 3)) or 0)
  return raw
end
local function settle_backlog(backlog, served, held, session)
  if redis.call('LLEN', held) == 0 then
    redis.call('ZREM', backlog, session)
  else
    redis.call('ZADD', backlog, redis.call('HGET', served, session) or '0', session)
  end
end
local function dispatch(jobs, msgs, charged, cap, backlog, served, floor, queue, prefix, most)
  local n = 0
  local limit = tonumber(redis.call('GET', cap) or '-1')
  while n < most do
    if limit >= 0 and redis.call('LLEN', queue) >= limit then break end
    local top = redis.call('ZRANGE', backlog, 0, 0)
    if #top == 0 then break end
    local session = top[1]
    local job = redis.call('LPOP', prefix .. session)
    if job then
      local raw = take(job, session, served, floor, jobs, msgs, charged)
      if raw then redis.call('LPUSH', queue, raw) end
      n = n + 1
    end
    settle_backlog(backlog, served, prefix .. session, session)
  end
  return n
end
"""

# KEYS: backlog served floor jobs messages charged cap queue
# ARGV: held prefix, job id, session, meta, message
_HOLD = (
    _PRELUDE
    + """
local held = ARGV[1] .. ARGV[3]
if redis.call('LLEN', held) == 0 then
  -- Starting a backlog: lifted to the least served backlogged session (or the last
  -- dispatched one's count), so that time spent idle is no credit.
  local top = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
  local base = tonumber(top[2] or redis.call('GET', KEYS[3]) or '0')
  local mine = tonumber(redis.call('HGET', KEYS[2], ARGV[3]) or '0')
  if mine < base then
    mine = base
    redis.call('HSET', KEYS[2], ARGV[3], tostring(mine))
  end
  redis.call('ZADD', KEYS[1], mine, ARGV[3])
end
redis.call('RPUSH', held, ARGV[2])
redis.call('HSET', KEYS[4], ARGV[2], ARGV[4])
redis.call('HSET', KEYS[5], ARGV[2], ARGV[5])
return dispatch(KEYS[4], KEYS[5], KEYS[6], KEYS[7], KEYS[1], KEYS[2], KEYS[3], KEYS[8],
                ARGV[1], 1000)
"""
)

# KEYS: jobs messages charged cap, then per level: backlog served floor queue
# ARGV: most, then per level: held prefix
_DISPATCH = (
    _PRELUDE
    + """
local n = 0
for i = 2, #ARGV do
  local k = 4 + (i - 2) * 4
  n = n + dispatch(KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[k + 1], KEYS[k + 2], KEYS[k + 3],
                   KEYS[k + 4], ARGV[i], tonumber(ARGV[1]))
end
return n
"""
)

# KEYS: charged backlog served; ARGV: job id, session, real cost (unweighted)
_SETTLE = (
    _PRELUDE
    + """
local meta = redis.call('HGET', KEYS[1], ARGV[1])
if not meta then return 0 end
redis.call('HDEL', KEYS[1], ARGV[1])
if field(meta, 1) ~= ARGV[2] then return 0 end
local weight = tonumber(field(meta, 5)) or 1
local delta = tonumber(ARGV[3]) / weight - (tonumber(field(meta, 3)) or 0)
local now = redis.call('HINCRBYFLOAT', KEYS[3], ARGV[2], delta)
redis.call('ZADD', KEYS[2], 'XX', now, ARGV[2])
return 1
"""
)

# KEYS: jobs messages held backlog; ARGV: job id, its meta as read, session
_WITHDRAW = """
if redis.call('HGET', KEYS[1], ARGV[1]) ~= ARGV[2] then return 0 end
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('HDEL', KEYS[2], ARGV[1])
redis.call('LREM', KEYS[3], 1, ARGV[1])
if redis.call('LLEN', KEYS[3]) == 0 then redis.call('ZREM', KEYS[4], ARGV[3]) end
return 1
"""

# KEYS: backlog served floor jobs messages charged queue-one-priority-up
# ARGV: held prefix, submitted before (seconds since the epoch), most
_AGE = (
    _PRELUDE
    + """
local aged = {}
for _, session in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
  local held = ARGV[1] .. session
  while #aged < tonumber(ARGV[3]) do
    local job = redis.call('LINDEX', held, 0)
    if not job then break end
    local meta = redis.call('HGET', KEYS[4], job)
    local at = meta and tonumber(field(meta, 4))
    if at and at > tonumber(ARGV[2]) then break end
    redis.call('LPOP', held)
    local raw = take(job, session, KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6])
    if raw then table.insert(aged, {at or 0, raw}) end
  end
  settle_backlog(KEYS[1], KEYS[2], held, session)
end
-- The oldest ends at the right end of the list, which the workers take next.
table.sort(aged, function(a, b) return a[1] > b[1] end)
for _, item in ipairs(aged) do redis.call('RPUSH', KEYS[7], item[2]) end
return #aged
"""
)


# -- what a job costs --------------------------------------------------------------------
def estimate(request: Request, output_weight: float) -> float:
    """A job's service before it runs: its prompt at about four characters a token, and
    max_tokens output tokens at their weight."""
    if request.messages is not None:
        chars = sum(len(m.content) for m in request.messages) + 4 * len(request.messages)
    else:
        chars = len(request.prompt or "")
    return math.ceil(chars / CHARS_PER_TOKEN) + output_weight * request.stopping.max_tokens


def cost(prompt_tokens: int, completion_tokens: int, output_weight: float) -> float:
    """A job's service once it ran: input tokens plus the weight times output tokens."""
    return prompt_tokens + output_weight * completion_tokens


def header(request: Request, step: int, weight: float, output_weight: float) -> dict[str, Any]:
    """The message header that files a job under its session (read by the transport)."""
    return {
        "model": request.model,
        "step": step,
        "session": request.session,
        "charge": round(estimate(request, output_weight) / weight, 3),
        "weight": weight,
        "submitted": request.submitted_at or 0.0,
    }


# -- the scripts' calls ----------------------------------------------------------------------
def _level_keys(model: str, step: int) -> list[str]:
    return [fair_level_key(model, step, p) for p in ("backlog", "served", "floor")]


def hold_call(job_id: str, fair: dict[str, Any], message: str) -> tuple[str, list[Any]]:
    """The HOLD script's (text, keys + args) for a message with a FAIR_HEADER: the
    transport runs it instead of pushing the message on the Celery list."""
    model, step, session = str(fair["model"]), int(fair["step"]), str(fair["session"])
    keys = [
        *_level_keys(model, step),
        fair_jobs_key(model),
        fair_messages_key(model),
        fair_charged_key(model),
        fair_cap_key(model),
        priority_list_key(model, step),
    ]
    meta = "\t".join(
        [session, str(step), str(fair["charge"]), str(fair["submitted"]), str(fair["weight"])]
    )
    return _HOLD, [len(keys), *keys, fair_held_key(model, step, ""), job_id, session, meta,
                   message]  # fmt: skip


@cache
def sha(script: str) -> str:
    """The script's SHA-1, as EVALSHA names it."""
    return hashlib.sha1(script.encode()).hexdigest()


def is_held(headers: dict[str, Any]) -> bool:
    return isinstance(headers.get(FAIR_HEADER), dict)


def dispatch(r: Any, model: str, most: int = MOST_PER_CALL) -> int:
    """Fill the model's Celery queue, every priority step up to its cap, from the least
    served sessions' held jobs; returns how many were dispatched."""
    keys = [fair_jobs_key(model), fair_messages_key(model), fair_charged_key(model),
            fair_cap_key(model)]  # fmt: skip
    args: list[Any] = [most]
    for step in PRIORITY_STEPS:
        keys += [*_level_keys(model, step), priority_list_key(model, step)]
        args.append(fair_held_key(model, step, ""))
    return int(r.register_script(_DISPATCH)(keys=keys, args=args))


def set_cap(r: Any, model: str, cap: int) -> None:
    """Jobs of each priority step the model's Celery queue holds before jobs are held."""
    r.set(fair_cap_key(model), max(1, cap))


def settle(r: Any, model: str, step: int, session: str, job_id: str, real: float) -> bool:
    """Correct a dispatched job's charge to its real cost, once; False when it was settled
    already or never held (a job from before fair share)."""
    keys = [fair_charged_key(model), *_level_keys(model, step)[:2]]
    return bool(r.register_script(_SETTLE)(keys=keys, args=[job_id, session, real]))


def withdraw(r: Any, model: str, job_id: str) -> bool:
    """Take a held job out before it is dispatched (a cancel): True when it was held."""
    meta = r.hget(fair_jobs_key(model), job_id)
    if meta is None:
        return False
    session, step = meta.split("\t")[:2]
    keys = [
        fair_jobs_key(model),
        fair_messages_key(model),
        fair_held_key(model, int(step), session),
        fair_level_key(model, int(step), "backlog"),
    ]
    return bool(r.register_script(_WITHDRAW)(keys=keys, args=[job_id, meta, session]))


def age(r: Any, model: str, step: int, into: int, before: float, most: int) -> int:
    """Dispatch every held job of `step` submitted before `before` to the front of the
    Celery list of step `into` (its session is charged as usual); returns how many."""
    keys = [
        *_level_keys(model, step),
        fair_jobs_key(model),
        fair_messages_key(model),
        fair_charged_key(model),
        priority_list_key(model, into),
    ]
    args = [fair_held_key(model, step, ""), before, most]
    return int(r.register_script(_AGE)(keys=keys, args=args))
