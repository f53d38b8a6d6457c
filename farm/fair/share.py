"""Each session's share, as `farm status` and the metrics show it: its jobs queued (held
for their fair turn, or dispatched and waiting in a Celery queue), its weight, and the
weighted tokens it was served in the last few minutes, of all served then."""

from __future__ import annotations

import json
from collections import Counter
from datetime import timedelta
from typing import Any

from farm.context import FarmContext
from farm.fair.place import held_per_session
from farm.queue import FAIR_HEADER, PRIORITY_STEPS, priority_list_key
from farm.registry import queries, transaction
from farm.registry.tables import utcnow

WINDOW_S = 300  # "served lately": the last five minutes
SCAN_MOST = 1000  # messages read per Celery list to attribute them to sessions


def queued_per_session(ctx: FarmContext, models: list[str]) -> Counter[str]:
    """Jobs waiting per session over the models: held, and in the Celery lists (whose
    length the caps keep small; past SCAN_MOST a list's other messages are not counted)."""
    r = ctx.broker_redis
    found: Counter[str] = Counter()
    for model in models:
        for per in held_per_session(r, model).values():
            found.update(per)
        pipe = r.pipeline(transaction=False)
        for step in PRIORITY_STEPS:
            pipe.lrange(priority_list_key(model, step), 0, SCAN_MOST - 1)
        for raw in (raw for raws in pipe.execute() for raw in raws):
            try:
                found[json.loads(raw)["headers"][FAIR_HEADER]["session"]] += 1
            except (ValueError, KeyError, TypeError):
                continue  # a message from before fair share, or not farm's
    return found


def session_shares(ctx: FarmContext, models: list[str]) -> list[dict[str, Any]]:
    """One row per session queued now or served in the last WINDOW_S seconds, most served
    first: session, weight, queued, jobs and weighted tokens served lately, and share (of
    all tokens served lately, 0 to 1)."""
    queued = queued_per_session(ctx, models)
    with transaction(ctx.database_url) as s:
        served = queries.served_since(s, utcnow() - timedelta(seconds=WINDOW_S))
        weights = {q.session: q.weight for q in queries.list_quotas(s) if q.weight}
    w = ctx.settings.fair_output_weight
    tokens = {name: p + w * c for name, (_, p, c) in served.items()}
    total = sum(tokens.values()) or 1.0
    rows = [
        {
            "session": name,
            "weight": weights.get(name, 1.0),
            "queued": queued.get(name, 0),
            "served_jobs": served.get(name, (0, 0, 0))[0],
            "served_tokens": round(tokens.get(name, 0.0)),
            "share": round(tokens.get(name, 0.0) / total, 3),
        }
        for name in set(queued) | set(served)
    ]
    return sorted(rows, key=lambda row: (-row["served_tokens"], -row["queued"], row["session"]))
