"""Fair share between sessions within each priority: the Virtual Token Counter on Celery.

Within a priority, Celery serves a model's queue first come, first served, fleet-wide: a
session that queues 200 jobs makes everyone after it wait for all 200. farm holds jobs back
instead, in Redis lists per session, and keeps only a few of each priority step in the
model's Celery queue (a quarter of its live slots, or FARM_FAIR_QUEUED: farm/fair/fleet.py
says why): the rest are dispatched one
by one to the backlogged session that has received the least weighted service (Sheng et
al., "Fairness in Serving Large Language Models", OSDI 2024):

    served[session] += (input tokens + FARM_FAIR_OUTPUT_WEIGHT x output tokens) / weight

charged when a job is dispatched (its prompt at ~4 characters a token, and max_tokens) and
corrected to the real counts when it ends. A session that starts a backlog has its counter
lifted to the least of the backlogged ones (or, with none, to the last dispatched one's), so
nobody banks credit while idle; two backlogged sessions' service then never differs by more
than about one job's charge plus the jobs already in the Celery queue.

    submit (Channel._put) --hold--> held:<session> --dispatch (least served)--> Celery list
                                       |                                        |
                           cancel: withdrawn at once                  worker (prefetch 1 per slot)

Why this shape (measured, bench/fairness.py): Celery and kombu stay the broker. kombu
builds every message as it always does; farm's transport only files it under its session
(`farm.broker.Channel._put`), and a dispatch moves those very bytes into kombu's list for
the job's priority step, inside one Redis script. There is no dispatcher process to run,
lose or elect: the submit that holds a job dispatches in the same script when the queue
has room, every worker dispatches for a job's model as it takes the job (the moment a
place opens) and on its heartbeat (caps, aging). Each dispatch is atomic in Redis, so a
client or worker killed at any point loses no job and queues none twice, and any process
carries on where another stopped (the guarantee the batch feeder's lock gives, without a
lock to wait for). Priorities stay strict across levels: each step has its own cap, so a
high job is dispatched at once and Celery's own priority lists put it first; aging lifts
held jobs as it lifts queued ones (farm/admission/aging.py).
"""
