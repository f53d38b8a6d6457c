"""`farm worker`: load models, then serve their queues with a Celery worker.

    registry records -> ModelCache.preload (pinned first, then what fits the budget)
    -> warm-up generation each -> Celery worker on the models' queues (solo pool, prefetch 1)
    -> on worker_ready: register + lease every model (loaded or on demand) + heartbeat
    -> on shutdown: the running job finishes, then the leases are dropped

The models load before the worker consumes: a worker whose model fails to load exits
non-zero with the reason and never holds a lease.
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
from typing import Any

from celery.signals import task_revoked, worker_ready, worker_shutdown

from farm.context import get_context
from farm.errors import FarmError
from farm.queue import queue_name
from farm.registry import queries, transaction
from farm.registry.db import require_schema
from workers import control
from workers.heartbeat import Membership
from workers.host import ModelSpec
from workers.models import ModelCache, parse_size
from workers.tasks import JobRunner, register_task

log = logging.getLogger("farm.worker")

EXIT_START_FAILED = 2


def load_spec(database_url: str, model: str) -> ModelSpec:
    with transaction(database_url) as s:
        record = queries.get_model(s, model)
        return ModelSpec(
            name=record.name,
            path=record.path,
            n_ctx=record.n_ctx,
            n_gpu_layers=record.n_gpu_layers,
            chat_format=record.chat_format,
            defaults=dict(record.defaults),
        )


def default_worker_id(models: list[str], device: str | None) -> str:
    who = models[0] if len(models) == 1 else "farm"
    return f"{who}-{device if device is not None else os.getpid()}@{socket.gethostname()}"


def serve(
    models: list[str],
    *,
    name: str | None = None,
    device: str | None = None,
    memory_budget: str | None = None,
    pinned: list[str] | None = None,
    keep_alive: float | None = None,
    loglevel: str = "INFO",
) -> int:
    """Load `models` and serve their queues until stopped. Returns the exit status."""
    logging.basicConfig(level=loglevel, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    ctx = get_context()
    if not ctx.settings.log_prompts:
        # Celery logs each task's return value, which holds the generated text: user data.
        logging.getLogger("celery.app.trace").setLevel(logging.WARNING)
    if device is not None:
        # llama.cpp's CUDA backend then sees only this GPU, as its device 0.
        os.environ["CUDA_VISIBLE_DEVICES"] = device
    worker_id = name or default_worker_id(models, device)
    device_label = "cpu" if device is None else f"gpu{device}"
    membership = Membership(ctx, worker_id, device_label)
    try:
        require_schema(ctx.database_url)
        specs = [load_spec(ctx.database_url, m) for m in models]
        cache = ModelCache(
            specs,
            budget=parse_size(memory_budget) if memory_budget else None,
            pinned=frozenset(pinned or ()),
            keep_alive=keep_alive,
            on_change=membership.sync,
        )
        membership.cache = cache
        membership.begin()  # claims the id and device; registered as starting
        cache.preload()
        if device is None:
            device_label = cache.device()
        app = ctx.app
    except FarmError as e:
        membership.leave()
        print(f"farm worker: cannot serve {', '.join(models)}: {e}", file=sys.stderr)
        return EXIT_START_FAILED
    except BaseException:
        membership.leave()  # Ctrl-C or a crash while loading: no 'starting' row left behind
        raise

    runner = JobRunner(ctx, worker_id, cache)
    register_task(app, runner)
    control.bind(cache, membership, lambda m: load_spec(ctx.database_url, m))

    @worker_ready.connect(weak=False)
    def _ready(**_: object) -> None:
        membership.join(device_label)
        print(
            f"farm worker {worker_id}: serving {', '.join(models)} on {device_label} "
            f"(loaded: {', '.join(cache.loaded()) or 'none'})",
            flush=True,
        )

    @task_revoked.connect(weak=False)
    def _revoked(request: Any = None, expired: bool = False, **_: object) -> None:
        # Cancelled jobs are recorded by whoever cancelled them; expired ones only here.
        if expired and request is not None:
            runner.expired(request.id, getattr(request, "expires", None), request.args)

    @worker_shutdown.connect(weak=False)
    def _shutdown(**_: object) -> None:
        membership.leave()
        cache.close()

    app.worker_main(
        [
            "worker",
            f"--hostname={worker_id}",
            f"--queues={','.join(queue_name(m) for m in models)}",
            "--pool=solo",
            "--concurrency=1",
            "--prefetch-multiplier=1",
            "--without-mingle",
            "--without-gossip",
            "--task-events",
            f"--loglevel={loglevel}",
        ]
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="farm worker", description=__doc__)
    parser.add_argument("--model", action="append", default=[], help="a model to serve")
    parser.add_argument("--models", default="", help="models to serve, comma separated")
    parser.add_argument("--name", help="worker id (default MODEL-PID@HOST)")
    parser.add_argument("--device", help="GPU index to use (sets CUDA_VISIBLE_DEVICES)")
    parser.add_argument("--memory-budget", help="most memory for loaded models, e.g. 20GiB")
    parser.add_argument("--pin", action="append", default=[], help="a model never unloaded")
    parser.add_argument(
        "--keep-alive", type=float, help="unload a model unused for this many seconds"
    )
    parser.add_argument("--loglevel", default="INFO")
    args = parser.parse_args(argv)
    models = list(dict.fromkeys(args.model + [m for m in args.models.split(",") if m]))
    if not models:
        parser.error("name a model: --model NAME or --models A,B")
    return serve(
        models,
        name=args.name,
        device=args.device,
        memory_budget=args.memory_budget,
        pinned=args.pin,
        keep_alive=args.keep_alive,
        loglevel=args.loglevel,
    )


if __name__ == "__main__":
    sys.exit(main())
