"""`farm worker`: load models, then serve their queues with a Celery worker.

    registry records -> ModelCache.preload (pinned first, then what fits the budget)
    -> each model's engine started (--parallel slots) and warmed up
    -> Celery worker on the models' queues: a thread per slot, prefetch 1 per thread, so it
       holds no more jobs than it has slots and never a job that waits inside it
    -> on worker_ready: register + lease every model (loaded or on demand) + heartbeat
    -> on shutdown: the running job finishes, then the leases are dropped

The models load before the worker consumes: a worker whose model fails to load exits
non-zero with the reason and never holds a lease.
"""

from __future__ import annotations

import argparse
import faulthandler
import functools
import logging
import os
import signal
import socket
import sys
from collections.abc import Callable
from typing import Any

import llama_cpp
from celery.signals import task_revoked, worker_init, worker_ready, worker_shutdown
from celery.worker.consumer import consumer

from farm.context import get_context
from farm.errors import FarmError
from farm.queue import TASK_NAME, queue_name
from farm.registry import queries, transaction
from farm.registry.db import require_schema
from workers import control
from workers.engine.engine import MAX_SLOTS
from workers.heartbeat import Membership
from workers.host import EngineOptions, ModelHost, available_cores
from workers.models import ModelCache, parse_size
from workers.spec import ModelSpec
from workers.spool import UsageSpool
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
            embedding=record.embedding,
            pooling=record.pooling,
            normalize=record.normalize,
            dimensions=tuple(record.dimensions) if record.dimensions else None,
        )


def simulated(tokens_per_s: float) -> Callable[[ModelSpec, EngineOptions], ModelHost]:
    """ModelCache's host factory for `--simulate`: the twin host at that pace."""
    from workers.twin import TwinHost

    return functools.partial(TwinHost, seconds_per_token=1.0 / tokens_per_s)


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
    parallel: int | None = None,
    threads: int | None = None,
    kv_size: int | None = None,
    loglevel: str = "INFO",
    simulate: float | None = None,
) -> int:
    """Load `models` and serve their queues until stopped. Returns the exit status.
    `simulate`: serve them on the engine's in-memory twin at this many tokens a second
    per sequence (workers/twin.py: no model file, no llama.cpp; the rest of the worker is
    the real one), for fleet simulations and tests."""
    logging.basicConfig(level=loglevel, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # `kill -USR1 PID` prints every thread's stack to the worker's log: what is it doing?
    faulthandler.register(signal.SIGUSR1, file=sys.stderr, all_threads=True)
    try:
        ctx = get_context()
    except FarmError as e:  # a setting that does not parse (FARM_...): say which, no traceback
        print(f"farm worker: cannot serve {', '.join(models)}: {e}", file=sys.stderr)
        return EXIT_START_FAILED
    if not ctx.settings.log_prompts:
        # Celery logs each task's return value, which holds the generated text: user data.
        logging.getLogger("celery.app.trace").setLevel(logging.WARNING)
    if device is not None:
        # llama.cpp's CUDA backend then sees only this GPU, as its device 0.
        os.environ["CUDA_VISIBLE_DEVICES"] = device
    worker_id = name or default_worker_id(models, device)
    device_label = "cpu" if device is None else f"gpu{device}"
    options = EngineOptions(
        slots=parallel or default_parallel(), threads=threads or available_cores(), kv_size=kv_size
    )
    membership = Membership(ctx, worker_id, device_label)
    membership.options = options
    spool = UsageSpool(ctx.settings.home / "spool", worker_id)
    membership.spool = spool  # the heartbeat writes what the spool kept, once it can
    try:
        require_schema(ctx.database_url)
        specs = [load_spec(ctx.database_url, m) for m in models]
        cache = ModelCache(
            specs,
            budget=parse_size(memory_budget) if memory_budget else None,
            pinned=frozenset(pinned or ()),
            keep_alive=keep_alive,
            on_change=membership.sync,
            options=options,
            **({} if simulate is None else {"host_factory": simulated(simulate)}),
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

    # A job's result stored on a connection that the network broke while the job ran (its
    # host cut off, then back: tests/test_hosts.py) failed at the first try, and Celery then
    # recorded a job that had succeeded as failed. Retry on a new connection instead, for
    # about the window a worker rides out a lost Redis (RECONNECT_WINDOW_S).
    app.conf.result_backend_always_retry = True
    app.conf.result_backend_max_retries = 10
    runner = JobRunner(ctx, worker_id, cache, spool)
    register_task(app, runner)
    _only_farms_task(app)
    _keep_bodies_out_of_logs()
    control.bind(cache, membership, lambda m: load_spec(ctx.database_url, m))

    @worker_ready.connect(weak=False)
    def _ready(**_: object) -> None:
        membership.join(device_label)
        print(
            f"farm worker {worker_id}: serving {', '.join(models)} on {device_label} "
            f"(loaded: {', '.join(cache.loaded()) or 'none'}; {options.slots} slots, "
            f"{options.threads} threads)",
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

    return run_celery_worker(
        app,
        [
            "worker",
            f"--hostname={worker_id}",
            f"--queues={','.join(queue_name(m) for m in models)}",
            # A thread per slot: the consumer stays free for control commands (inspect,
            # Flower) while every slot generates, and a freed slot takes the next job.
            "--pool=threads",
            f"--concurrency={options.slots}",
            "--prefetch-multiplier=1",
            "--without-mingle",
            "--without-gossip",
            "--task-events",
            f"--loglevel={loglevel}",
        ],
    )


def run_celery_worker(app: Any, argv: list[str]) -> int:
    """Run Celery's worker command and return the worker's own exit status.

    Neither `app.start` nor `app.worker_main` returns it: under click 8.2+ in
    non-standalone mode the command's `ctx.exit(worker.exitcode)` comes back as a return
    value that `app.start` drops, so a worker that stopped on an "Unrecoverable error" (a
    broker gone between a job's end and its ack) exited 0, and `restart: on-failure` or
    a supervisor left the fleet without it. The WorkController is taken from Celery's
    `worker_init` signal and its exitcode read once it has stopped.
    """
    controllers: list[Any] = []

    def _seen(sender: Any = None, **_: object) -> None:
        controllers.append(sender)

    worker_init.connect(_seen, weak=False)
    try:
        returned = app.start(argv)
    finally:
        worker_init.disconnect(_seen)
    if controllers and controllers[-1].exitcode is not None:
        return int(controllers[-1].exitcode)
    return int(returned or 0)


def _only_farms_task(app: Any) -> None:
    """Celery's built-in tasks (celery.backend_cleanup, celery.chord_unlock ...) must not
    run on a model's queue: unregistered here, such a message is discarded like any
    unknown task."""
    for name in list(app.tasks):
        if name != TASK_NAME:
            app.tasks.unregister(name)


class _NoBodies(logging.Filter):
    """Celery logs the whole body of an unknown or invalid message: farm's hold prompts."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.msg is consumer.UNKNOWN_TASK_ERROR:
            record.msg = "discarded a message for a task this worker does not run (%s)"
            record.args = (record.args[0],) if isinstance(record.args, tuple) else ()
        elif record.msg is consumer.INVALID_TASK_ERROR:
            record.msg = "discarded an invalid message (%s)"
            record.args = (record.args[0],) if isinstance(record.args, tuple) else ()
        else:
            return True
        record.exc_info = record.exc_text = None
        return True


def _keep_bodies_out_of_logs() -> None:
    logging.getLogger("celery.worker.consumer.consumer").addFilter(_NoBodies())


def default_parallel() -> int:
    """Slots per model when --parallel is not given: more on a GPU, where batching pays most."""
    return 16 if llama_cpp.llama_supports_gpu_offload() else 4


def _positive(what: str, most: int | None = None) -> Any:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{what} must be a whole number, not {text!r}"
            ) from None
        if value < 1:
            raise argparse.ArgumentTypeError(f"{what} must be at least 1, not {value}")
        if most is not None and value > most:
            raise argparse.ArgumentTypeError(f"{what} must be at most {most}, not {value}")
        return value

    return parse


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
    parser.add_argument(
        "--parallel",
        type=_positive("--parallel", MAX_SLOTS),
        help="sequences generated together per model (slots); default 16 on a GPU, 4 on CPU",
    )
    parser.add_argument(
        "--threads",
        type=_positive("--threads"),
        help=f"CPU threads for generation and prompts (default: the {available_cores()} cores "
        "this process may use)",
    )
    parser.add_argument(
        "--kv-size",
        type=_positive("--kv-size"),
        help="KV cache cells shared by a model's slots (default: the model's n_ctx x slots)",
    )
    parser.add_argument(
        "--simulate",
        type=float,
        metavar="TOKENS_PER_S",
        help="load no model: generate on the engine's in-memory twin at this pace (the "
        "prompt echoed back, a token per byte), for fleet simulations and tests",
    )
    parser.add_argument("--loglevel", default="INFO")
    args = parser.parse_args(argv)
    if args.simulate is not None and not args.simulate > 0:
        parser.error("--simulate takes tokens per second, above 0")
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
        parallel=args.parallel,
        threads=args.threads,
        kv_size=args.kv_size,
        loglevel=args.loglevel,
        simulate=args.simulate,
    )


if __name__ == "__main__":
    sys.exit(main())
