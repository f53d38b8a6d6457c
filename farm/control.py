"""Steering running workers: load or unload a model on one of them.

Sent as Celery control commands (`workers/control.py` answers them) to one worker by its id.
A worker busy with a generation answers when the generation ends.
"""

from __future__ import annotations

from typing import Any

from farm.context import FarmContext, get_context
from farm.errors import ControlFailed, UnknownWorker
from farm.registry import queries, transaction


def _live_workers(ctx: FarmContext) -> list[str]:
    with transaction(ctx.database_url) as s:
        return sorted({lease.worker_id for lease in queries.live_leases(s)})


def steer(
    action: str, model: str, worker: str, *, timeout: float = 60.0, ctx: FarmContext | None = None
) -> dict[str, Any]:
    """Ask `worker` to load or unload `model`; returns its answer."""
    assert action in ("load", "unload")
    ctx = ctx or get_context()
    with transaction(ctx.database_url) as s:
        queries.get_model(s, model)  # UnknownModel lists the known ones
    live = _live_workers(ctx)
    if worker not in live:
        raise UnknownWorker(
            f"no live worker '{worker}'; live workers: {', '.join(live) or 'none'} "
            "(see `farm status`)"
        )
    replies = ctx.app.control.broadcast(
        f"farm_{action}_model",
        arguments={"model": model},
        destination=[worker],
        reply=True,
        timeout=timeout,
    )
    answer = next((r[worker] for r in replies if worker in r), None)
    if answer is None:
        raise ControlFailed(
            f"worker {worker} did not answer within {timeout:g}s (busy with a long "
            "generation? it answers when the generation ends); try again with a longer --timeout"
        )
    if "error" in answer:
        raise ControlFailed(f"worker {worker}: {answer['error']}")
    return dict(answer)
