"""A job's stream: the protocol workers write and clients read, on one Redis stream per job
(`queue.stream_key(job_id)`).

A worker's writes are fenced (`Fenced`): each is refused, atomically, once the job was
cancelled (so no text reaches a reader after `Job.cancel()` returns) or once the run that
writes no longer holds the job (its worker was cut off and another took the job over).

A worker appends a `token` event per piece of text, a `tool_call` event per piece of a tool
call (a `ToolCallDelta` as JSON in `delta`), `restart` when the job starts over on
another worker (the text then repeats from the start), and one final event: `done` (with the
Completion as JSON), `failed` (with the reason) or `cancelled`. `Job.cancel` writes
`cancelled` itself for a job that never started.
"""

from __future__ import annotations

import json
from typing import Any

import redis

from farm.queue import cancel_key, run_key, stream_key, written_key

# Event kinds on a job's stream.
TOKEN, DONE, FAILED, CANCELLED = "token", "done", "failed", "cancelled"
RESTART = "restart"  # the worker running the job was lost; another starts it over
TOOL_CALL = "tool_call"  # a piece of a tool call: its `delta` field
TERMINAL_EVENTS = (DONE, FAILED, CANCELLED)
# How long a reader (or a worker publishing) rides out a lost connection to Redis.
RECONNECT_WINDOW_S = 30.0

_OUTCOMES = {DONE: "succeeded", FAILED: "failed", CANCELLED: "cancelled"}


def last_event(r: redis.Redis, job_id: str) -> tuple[str, dict[str, str]] | None:
    """The kind and fields of the last event on a job's stream, if it has one."""
    last: Any = r.xrevrange(stream_key(job_id), count=1)
    return (last[0][1].get("kind", ""), last[0][1]) if last else None


def stream_outcome(r: redis.Redis, job_id: str) -> str | None:
    """succeeded, failed or cancelled when the job's stream ends with its final event."""
    event = last_event(r, job_id)
    return _OUTCOMES.get(event[0]) if event else None


def publish(
    r: redis.Redis, job_id: str, kind: str, *, ttl: int | None = None, **fields: Any
) -> None:
    """Append one event to a job's stream; with `ttl`, (re)set the stream's expiry too.

    Used by workers, and by `Job.cancel` for a job that never started.
    """
    payload = {"kind": kind}
    payload.update({k: v if isinstance(v, str) else json.dumps(v) for k, v in fields.items()})
    key = stream_key(job_id)
    if ttl is None:
        r.xadd(key, payload)  # type: ignore[arg-type]
        return
    pipe = r.pipeline(transaction=False)
    pipe.xadd(key, payload)  # type: ignore[arg-type]
    pipe.expire(key, ttl)
    pipe.execute()


# The run key holds the token of the run that holds the job; once that run ends, `ended:`
# and its token, for ENDED_TTL_S. The rules:
# - a run starting (claim) takes the key when it is free or says `ended:`; it waits while
#   another token holds it;
# - a running run keeps it (renew, and before each write) while it holds it, and takes it
#   again when it is free (a Redis restart lost it, or it expired while nobody else took
#   the job); once another run holds it, or a run ended the job, the run has lost it.
ENDED_TTL_S = 3600
# Lua: 1 when the run `ARGV[1]` holds the run key KEYS[1] now (taking it again if it is
# free, with ttl ARGV[2] ms), else 0.
_HOLDS = """
local function holds(key, token, ttl)
  local holder = redis.call('get', key)
  if holder == token then redis.call('pexpire', key, ttl) return 1 end
  if holder then return 0 end
  redis.call('set', key, token, 'PX', ttl)
  return 1
end
"""
# KEYS: the stream, the cancel flag, the run key, the written numbers. ARGV: the run's token,
# the run key's ttl (ms), the stream's ttl (s), the event's kind, its number in this run
# ('' for none: not deduplicated), then its fields and values. Returns WRITTEN, CANCELLED_
# (the job was cancelled: only a `cancelled` event is written) or LOST. An event whose
# number this run has written already is not written again (WRITTEN: it is there).
_FENCED_XADD = (
    _HOLDS
    + """
if holds(KEYS[3], ARGV[1], ARGV[2]) == 0 then return -1 end
if ARGV[4] ~= 'cancelled' and redis.call('exists', KEYS[2]) == 1 then return 0 end
if ARGV[5] ~= '' then
  local last = tonumber(redis.call('hget', KEYS[4], ARGV[1]) or '0')
  if tonumber(ARGV[5]) <= last then return 1 end
  redis.call('hset', KEYS[4], ARGV[1], ARGV[5])
  redis.call('expire', KEYS[4], ARGV[3])
end
redis.call('xadd', KEYS[1], '*', 'kind', ARGV[4], unpack(ARGV, 6))
redis.call('expire', KEYS[1], ARGV[3])
return 1
"""
)
# KEYS: the run key, the cancel flag. ARGV: the token, the ttl in ms. As a write would meet.
_CHECK = (
    _HOLDS
    + """
if holds(KEYS[1], ARGV[1], ARGV[2]) == 0 then return -1 end
if redis.call('exists', KEYS[2]) == 1 then return 0 end
return 1
"""
)
_RENEW = _HOLDS + "return holds(KEYS[1], ARGV[1], ARGV[2])"
# KEYS: the run key. ARGV: the token, the ttl in ms. 1 taken, 0 held by another run.
_CLAIM = """
local holder = redis.call('get', KEYS[1])
if holder and holder ~= ARGV[1] and string.sub(holder, 1, 6) ~= 'ended:' then return 0 end
redis.call('set', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
"""
# KEYS: the run key. ARGV: the token, the marker's ttl in s. The run ended the job: the key
# says so, so that a run cut off meanwhile cannot take the job back.
_RELEASE = """
if redis.call('get', KEYS[1]) == ARGV[1] then
  redis.call('set', KEYS[1], 'ended:' .. ARGV[1], 'EX', ARGV[2])
  return 1
end
return 0
"""
WRITTEN, CANCELLED_, LOST = 1, 0, -1

# KEYS: run keys. ARGV: a worker's token prefix (its id and ':'). Deletes those it holds.
_FREE = """
local freed = 0
for _, key in ipairs(KEYS) do
  local holder = redis.call('get', key)
  if holder and string.sub(holder, 1, #ARGV[1]) == ARGV[1] then
    redis.call('del', key)
    freed = freed + 1
  end
end
return freed
"""


def free_runs(r: redis.Redis, worker_id: str, job_ids: list[str]) -> int:
    """The worker `worker_id` is known to be dead (its process exited): the jobs' run keys
    it held are freed, so that their next delivery starts at once instead of waiting for
    the keys to expire (FARM_LEASE_TTL). Never for a worker only presumed lost (its lease
    expired): it may be alive behind a partition, and its key fences its writes off."""
    if not job_ids:
        return 0
    keys = [run_key(job_id) for job_id in job_ids]
    return int(r.eval(_FREE, len(keys), *keys, f"{worker_id}:"))


class Fenced:
    """One run's hold on a job and its fenced writes on the job's stream.

    `claim()` takes the job for a run starting (False while another live run holds it);
    `renew()` keeps it, False once it was lost; `publish()` writes an event unless the job
    was cancelled or the run lost the job, returning WRITTEN, CANCELLED_ or LOST; `check()`
    says which a write would meet; `release()` marks the job ended by this run.
    """

    def __init__(self, r: redis.Redis, job_id: str, token: str, ttl_s: float):
        self.r = r
        self.job_id = job_id
        self.token = token
        self.ttl_ms = max(1000, int(ttl_s * 1000))
        self.lost = False  # set by whoever renews it, once another run holds the job
        self._xadd = r.register_script(_FENCED_XADD)
        self._check = r.register_script(_CHECK)
        self._renew = r.register_script(_RENEW)
        self._claim = r.register_script(_CLAIM)
        self._release = r.register_script(_RELEASE)

    def claim(self) -> bool:
        return bool(self._claim(keys=[run_key(self.job_id)], args=[self.token, self.ttl_ms]))

    def renew(self, client: redis.Redis | None = None) -> bool:
        """Keep the job; `client`: another connection to the same Redis (with timeouts)."""
        args: list[str | int] = [self.token, self.ttl_ms]
        return bool(self._renew(keys=[run_key(self.job_id)], args=args, client=client))

    def check(self) -> int:
        """What a write would meet now, without writing: WRITTEN, CANCELLED_ or LOST."""
        keys = [run_key(self.job_id), cancel_key(self.job_id)]
        return int(self._check(keys=keys, args=[self.token, self.ttl_ms]))

    def release(self) -> None:
        self._release(keys=[run_key(self.job_id)], args=[self.token, ENDED_TTL_S])

    def publish(self, kind: str, *, ttl: int, **fields: Any) -> int:
        """Write an event on the job's stream, which then expires `ttl` seconds on."""
        return int(self.publish_on(self.r, kind, ttl=ttl, **fields))

    def publish_on(
        self, client: Any, kind: str, *, ttl: int, number: int | None = None, **fields: Any
    ) -> Any:
        """`publish` on `client`: a pipeline queues the write, and its result (WRITTEN,
        CANCELLED_ or LOST) comes with the pipeline's. With `number` (this run's events
        counted from 1, in order), a write sent again is not written twice."""
        flat: list[str] = []
        for k, v in fields.items():
            flat += [k, v if isinstance(v, str) else json.dumps(v)]
        job = self.job_id
        keys = [stream_key(job), cancel_key(job), run_key(job), written_key(job)]
        seen = "" if number is None else str(number)
        args: list[str | int] = [self.token, self.ttl_ms, ttl, kind, seen, *flat]
        return self._xadd(keys=keys, args=args, client=client)
