"""`farm worker --model NAME`: load a model, then serve its queue with a Celery worker.

    registry record -> ModelHost.load -> warm-up generation -> Celery worker on the model's
    queue (solo pool, prefetch 1) -> on worker_ready: register + lease + heartbeat
    -> on shutdown: the running job finishes, then the leases are dropped

The model loads before the worker consumes: a worker whose model fails to load exits
non-zero with the reason and never holds a lease.
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys

from celery.signals import worker_ready, worker_shutdown

from farm.context import get_context
from farm.errors import FarmError
from farm.queue import queue_name
from farm.registry import queries, transaction
from farm.registry.db import require_schema
from workers.heartbeat import Membership
from workers.host import ModelHost, ModelSpec
from workers.tasks import JobRunner, register_task

log = logging.getLogger("farm.worker")

EXIT_START_FAILED = 2


def load_spec(database_url: str, model: str) -> ModelSpec:
    require_schema(database_url)
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


def default_worker_id(model: str) -> str:
    return f"{model}-{os.getpid()}@{socket.gethostname()}"


def serve(model: str, *, name: str | None = None, loglevel: str = "INFO") -> int:
    """Load `model` and serve its queue until stopped. Returns the exit status."""
    logging.basicConfig(level=loglevel, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    ctx = get_context()
    if not ctx.settings.log_prompts:
        # Celery logs each task's return value, which holds the generated text: user data.
        logging.getLogger("celery.app.trace").setLevel(logging.WARNING)
    worker_id = name or default_worker_id(model)
    try:
        spec = load_spec(ctx.database_url, model)
        host = ModelHost(spec)
        host.load()
        host.warm_up()
        app = ctx.app
    except FarmError as e:
        print(f"farm worker: cannot serve '{model}': {e}", file=sys.stderr)
        return EXIT_START_FAILED

    register_task(app, JobRunner(ctx, worker_id, {model: host}))
    membership = Membership(ctx, worker_id, host.device, [model])

    @worker_ready.connect(weak=False)
    def _ready(**_: object) -> None:
        membership.join()
        print(f"farm worker {worker_id}: serving '{model}' on {host.device}", flush=True)

    @worker_shutdown.connect(weak=False)
    def _shutdown(**_: object) -> None:
        membership.leave()
        host.close()

    app.worker_main(
        [
            "worker",
            f"--hostname={worker_id}",
            f"--queues={queue_name(model)}",
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
    parser.add_argument("--model", required=True, help="registered model to serve")
    parser.add_argument("--name", help="worker id (default MODEL-PID@HOST)")
    parser.add_argument("--loglevel", default="INFO")
    args = parser.parse_args(argv)
    return serve(args.model, name=args.name, loglevel=args.loglevel)


if __name__ == "__main__":
    sys.exit(main())
