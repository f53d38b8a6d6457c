"""The Celery app on the broker: its settings, its Redis transport and result backend.

Clients, workers and Flower all make their app with `make_app`, so that the transport
options (priority steps, separator, visibility timeout) are the same everywhere.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from queue import Empty
from typing import Any
from urllib.parse import urlsplit

import celery.app.amqp
import kombu
from celery import Celery
from celery.backends.redis import RedisBackend, SentinelBackend
from kombu.transport.redis import Channel as RedisChannel
from kombu.transport.redis import SentinelChannel as RedisSentinelChannel
from kombu.transport.redis import SentinelTransport as RedisSentinelTransport
from kombu.transport.redis import Transport as RedisTransport
from kombu.utils.json import dumps
from redis.exceptions import NoScriptError

from farm import redis_url
from farm.config import Settings
from farm.fair import held
from farm.queue import (
    DEFAULT_PRIORITY,
    FAIR_HEADER,
    PRIORITY_STEPS,
    PUBLISH_RETRY,
    TASK_NAME,
    fair_messages_key,
    priority_list_key,
)

log = logging.getLogger(__name__)


# -- the Celery app -----------------------------------------------------------------------
def transport_options(settings: Settings) -> dict[str, Any]:
    return {
        "queue_order_strategy": "priority",
        "priority_steps": PRIORITY_STEPS,
        "visibility_timeout": settings.visibility_timeout,
        "socket_connect_timeout": settings.connect_timeout,
        **PUBLISH_RETRY,
    }


def route_job(
    name: str, args: Any, kwargs: Any, options: dict[str, Any], **_: Any
) -> dict[str, Any]:
    """Celery router: a job sent without a priority is normal; explicit options win."""
    return {"priority": DEFAULT_PRIORITY} if name == TASK_NAME else {}


class FarmChannel(RedisChannel):
    """kombu's Redis channel, with two changes.

    - A job sent with farm's fair-share header is held under its session (farm/fair/):
      kombu builds and routes the message as ever, and `_put` files those very bytes in
      one Redis script that also dispatches the least served session's jobs while the
      queue has room. Other messages are pushed as kombu pushes them.
    - Minus one way to kill a worker: a queued item that is not a kombu message (not JSON,
      or not its envelope) raised out of the consumer and stopped the worker. Such an item
      was already taken off the list; it is dropped with a log line and the worker goes on.
    """

    def _put(self, queue: str, message: dict[str, Any], **kwargs: Any) -> None:
        headers = message.get("headers") or {}
        if not held.is_held(headers):
            return super()._put(queue, message, **kwargs)
        script, call = held.hold_call(str(headers["id"]), headers[FAIR_HEADER], dumps(message))
        batch = kwargs.pop("_publish_batch", None)
        if batch is not None:  # Producer.batch(): one pipeline, flushed at its end
            batch.add("eval", script, *call)
            return None
        with self.conn_or_acquire() as client:
            try:
                client.evalsha(held.sha(script), *call)
            except NoScriptError:  # a Redis that restarted: send the script itself once
                client.eval(script, *call)
        return None

    def _brpop_read(self, **options: Any) -> Any:
        try:
            return super()._brpop_read(**options)
        except (ValueError, TypeError, KeyError, AttributeError) as e:
            log.error("dropped a queued item that is not a farm job (%s: %s)", type(e).__name__, e)
            raise Empty() from None


Channel = FarmChannel


class SentinelChannel(FarmChannel, RedisSentinelChannel):
    """farm's channel on the master Redis Sentinel names (kombu's SentinelChannel): its
    connections ask the sentinels where the master is, so they follow a failover."""


class Transport(RedisTransport):
    Channel = FarmChannel


class SentinelTransport(RedisSentinelTransport):
    Channel = SentinelChannel


TRANSPORT = f"{__name__}:{Transport.__name__}"
SENTINEL_TRANSPORT = f"{__name__}:{SentinelTransport.__name__}"


class ResultBackend(RedisBackend):
    """Celery's Redis result backend, minus the pub/sub subscription made on every send.

    farm's clients wait on the job's token stream, not on Celery's result channel; the
    subscription cost a round trip per submit and, with Redis down, a 20-second reconnect
    loop that ends with "the Celery application must be restarted".
    """

    def on_task_call(self, producer: Any, task_id: str) -> None:
        return None


class SentinelResultBackend(SentinelBackend):
    """ResultBackend's change on Celery's Sentinel result backend."""

    on_task_call = ResultBackend.on_task_call


RESULT_BACKEND = f"{__name__}.{ResultBackend.__name__}"
SENTINEL_RESULT_BACKEND = f"{__name__}.{SentinelResultBackend.__name__}"


# A worker's consumer tries its lost broker again after these waits (kombu's defaults, which
# Celery's consumer keeps: 2 s, then 4, 6, ... up to 30): a Sentinel failover takes a few
# seconds, and with kombu's waits the worker consumed again 6 s after the master was
# killed, 4 s after the promotion (tests/test_failover.py).
RECONNECT = {"interval_start": 0.5, "interval_step": 0.5, "interval_max": 5.0}


class Connection(kombu.Connection):
    """kombu's Connection, with two changes.

    - Shown with a mask only where it has a password: kombu's `as_uri` masks the password
      of a transport that does not parse URLs itself (Redis's among them) by putting its
      mask in every URL, password or not: the worker's "Connected to
      ...://:**@127.0.0.1:PORT/0" showed a password the embedded farm, whose broker has
      none, does not have.
    - Reconnects after RECONNECT's waits unless the caller gives its own.
    """

    def ensure_connection(self, *args: Any, **kwargs: Any) -> Any:
        if len(args) <= 2:  # (errback, max_retries), as Celery's consumer calls it
            kwargs = {**RECONNECT, **kwargs}
        return super().ensure_connection(*args, **kwargs)

    def as_uri(
        self, include_password: Any = False, mask: Any = "**", *args: Any, **kwargs: Any
    ) -> str:
        if not self.password:
            include_password = True  # nothing to hide: no mask
        return str(super().as_uri(include_password, mask, *args, **kwargs))


class AMQP(celery.app.amqp.AMQP):
    """Celery's messaging, on farm's Connection (so on every connection Celery logs)."""

    Connection = Connection


def make_app(settings: Settings, broker_url: str, result_url: str | None = None) -> Celery:
    """The Celery app shared by clients, workers and Flower.

    A Sentinel URL (farm/redis_url.py) becomes Celery's own form: the sentinels as the
    URL, the master's name in the transport options of the broker and the result backend.
    """
    timeout = settings.connect_timeout
    broker, broker_options = redis_url.for_celery(broker_url, timeout)
    results, results_options = redis_url.for_celery(result_url or broker_url, timeout)
    backend_class = SENTINEL_RESULT_BACKEND if results_options else RESULT_BACKEND
    app = Celery(
        "farm", broker=broker, backend=f"{backend_class}+{results}", amqp=f"{__name__}:AMQP"
    )
    scheme = urlsplit(broker).scheme
    if scheme in ("redis", "rediss"):
        app.conf.broker_transport = TRANSPORT
    elif scheme == redis_url.SENTINEL_SCHEME:
        app.conf.broker_transport = SENTINEL_TRANSPORT
    app.conf.update(
        # JSON only, on the wire and in results: never pickle.
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        result_accept_content=["json"],
        event_serializer="json",
        broker_transport_options={**transport_options(settings), **broker_options},
        result_backend_transport_options={
            "socket_connect_timeout": settings.connect_timeout,
            **results_options,
        },
        redis_socket_connect_timeout=settings.connect_timeout,
        broker_connection_timeout=settings.connect_timeout,
        broker_connection_retry_on_startup=True,
        task_default_priority=DEFAULT_PRIORITY,
        task_routes=(route_job,),
        task_default_queue="farm.default",
        task_create_missing_queues=True,
        # Priority holds only if a worker holds no job beyond the one it runs.
        worker_prefetch_multiplier=1,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        # No STARTED state nor task-sent event: each is a Redis round trip on every job's
        # path. Flower sees starts through worker events; farm's status is the registry's.
        task_track_started=False,
        task_time_limit=settings.job_time_limit,
        task_publish_retry_policy=dict(PUBLISH_RETRY),
        result_expires=24 * 3600,
        # Not result_extended: it would keep each job's arguments (the prompt) in Redis.
        result_extended=False,
        worker_send_task_events=True,
        task_send_sent_event=False,
        worker_hijack_root_logger=False,
        worker_cancel_long_running_tasks_on_connection_loss=True,
        enable_utc=True,
    )
    return app


def requeue_unacked(app: Celery, job_ids: Iterable[str]) -> set[str]:
    """Put jobs held by a dead worker back at the front of their queues, now.

    Redis has no acks: kombu keeps delivered messages in its `unacked` hash and restores
    them only after the visibility timeout. The registry knows which worker died holding
    which jobs, so find their messages and restore them with kombu's own `restore_by_tag`
    (atomic: of several callers, one restores each). Returns the ids found and restored.
    """
    wanted = set(job_ids)
    restored: set[str] = set()
    if not wanted:
        return restored
    with app.connection_for_write() as conn:
        channel: Any = conn.default_channel
        client = channel.client
        for tag, raw in client.hscan_iter(channel.unacked_key):
            try:
                job_id = json.loads(raw)[0]["headers"].get("id")
            except (ValueError, KeyError, IndexError, TypeError, AttributeError):
                continue
            if job_id in wanted and job_id not in restored:
                # leftmost=False: RPUSH, the end BRPOP takes from, so it runs next.
                channel.qos.restore_by_tag(tag, leftmost=False)
                restored.add(job_id)
    return restored


# KEYS: a list of kombu messages. ARGV: first and last index. Returns how many items the
# range held and the job ids among them (Celery's `id` header), read in Redis: the
# messages themselves (prompts) never cross the wire.
_LIST_IDS = """
local items = redis.call('LRANGE', KEYS[1], ARGV[1], ARGV[2])
local ids = {}
for _, raw in ipairs(items) do
  local ok, message = pcall(cjson.decode, raw)
  if ok and type(message) == 'table' and type(message['headers']) == 'table' then
    local id = message['headers']['id']
    if type(id) == 'string' then table.insert(ids, id) end
  end
end
return {#items, ids}
"""
SCAN_CHUNK = 1000  # messages read per script call: Redis runs nothing else meanwhile


def jobs_in_broker(app: Celery, models: Iterable[str]) -> set[str]:
    """The ids of the jobs whose messages the broker holds for `models`: queued on any of
    their priority lists, held for fair share (farm/fair/), or delivered to a worker and
    not acknowledged yet (kombu's `unacked`)."""
    found: set[str] = set()
    with app.connection_for_write() as conn:
        channel: Any = conn.default_channel
        client = channel.client
        ids_of = client.register_script(_LIST_IDS)
        for model in models:
            for step in PRIORITY_STEPS:
                start = 0
                while True:
                    # From the left: new messages go in on the left, so a push between two
                    # calls shows an item twice at most, never hides one.
                    n, ids = ids_of(keys=[priority_list_key(model, step)],
                                    args=[start, start + SCAN_CHUNK - 1])  # fmt: skip
                    found.update(_text(i) for i in ids)
                    if int(n) < SCAN_CHUNK:
                        break
                    start += SCAN_CHUNK
            found.update(_text(i) for i in client.hkeys(fair_messages_key(model)))
        for _tag, raw in client.hscan_iter(channel.unacked_key):
            try:
                found.add(str(json.loads(raw)[0]["headers"]["id"]))
            except (ValueError, KeyError, IndexError, TypeError, AttributeError):
                continue
    return found


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
