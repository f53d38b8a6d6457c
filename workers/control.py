"""Celery control commands a running worker answers: load and unload models.

    farm models load NAME --worker ID    -> broadcast farm_load_model to that worker
    farm models unload NAME --worker ID  -> broadcast farm_unload_model

They run in the worker's main loop, so with the solo pool a command sent during a
generation is handled when the generation ends: a model is never switched under a job.
"""

from __future__ import annotations

from typing import Any

from celery.worker.control import control_command

from farm.errors import FarmError
from farm.queue import queue_name
from workers.heartbeat import Membership
from workers.models import ModelCache, human

_bound: dict[str, Any] = {}


def bind(cache: ModelCache, membership: Membership, load_spec: Any) -> None:
    """Give the commands this process's models (one worker per process)."""
    _bound.update(cache=cache, membership=membership, load_spec=load_spec)


def _summary(cache: ModelCache) -> dict[str, Any]:
    return {"loaded": cache.loaded(), "serves": list(cache.specs), "used": human(cache.used)}


@control_command(args=[("model", str)], signature="<model>")
def farm_load_model(state: Any, model: str) -> dict[str, Any]:
    """Load a model now (evicting least recently used ones to fit), and serve its queue."""
    cache: ModelCache = _bound["cache"]
    new = model not in cache.specs
    try:
        if new:
            cache.add(_bound["load_spec"](model))
        cache.load(model)
    except FarmError as e:
        if new:  # leave no trace: no lease, no queue, for a model this worker cannot load
            cache.remove(model)
            _bound["membership"].sync()
        return {"error": str(e)}
    if new:
        state.consumer.add_task_queue(queue_name(model))
    _bound["membership"].sync()
    return {"ok": f"loaded {model}", **_summary(cache)}


@control_command(args=[("model", str)], signature="<model>")
def farm_unload_model(state: Any, model: str) -> dict[str, Any]:
    """Free a model's memory; the worker still serves it, loading it again on demand."""
    cache: ModelCache = _bound["cache"]
    if model not in cache.specs:
        return {"error": f"this worker does not serve model '{model}'"}
    if not cache.unload(model):
        return {"error": f"model '{model}' is not loaded on this worker"}
    _bound["membership"].sync()
    return {"ok": f"unloaded {model}", **_summary(cache)}
