"""`farm up`, `farm fleet`, `farm worker`, `farm flower`, `farm status`: running and watching the farm."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import sys
from typing import Annotated, Any

import typer

from farm.cli.base import app, err, fold_table, friendly, get_settings, out
from farm.cli.jobs import follow

PARALLEL = typer.Option(
    "--parallel",
    min=1,
    max=256,  # llama.cpp's limit on sequences per context
    help="slots (sequences generated together) of each worker started; default: the "
    "models file's `parallel` for its model, else 4 on a CPU, 16 on a GPU",
)


@app.command()
@friendly
def up(
    model: Annotated[
        list[str] | None, typer.Option("--model", "-m", help="models to serve (repeatable)")
    ] = None,
    profile: Annotated[
        str | None, typer.Option(help="serve a profile of the models file (FARM_MODELS_FILE)")
    ] = None,
    ask: Annotated[str | None, typer.Option(help="once ready, answer this prompt")] = None,
    once: Annotated[bool, typer.Option(help="with --ask: stop after answering")] = False,
    grace: Annotated[
        float, typer.Option(help="seconds a stopping worker may finish its job")
    ] = 30.0,
    port: Annotated[
        int, typer.Option(help="the OpenAI-compatible gateway's port on 127.0.0.1 (0: none)")
    ] = 8000,
    parallel: Annotated[int | None, PARALLEL] = None,
) -> None:
    """Start a whole farm here: broker, registry, one worker per model, the batch feeder
    and the OpenAI-compatible gateway on 127.0.0.1. Ctrl-C stops it.

    With FARM_BROKER_URL set, no broker is started: the workers join that farm."""
    _run_farm(model, profile, ask, once, grace, port, parallel)


@app.command()
@friendly
def fleet(
    model: Annotated[
        list[str] | None, typer.Option("--model", "-m", help="models to serve (repeatable)")
    ] = None,
    profile: Annotated[str | None, typer.Option(help="serve a profile of the models file")] = None,
    grace: Annotated[
        float, typer.Option(help="seconds a stopping worker may finish its job")
    ] = 30.0,
    parallel: Annotated[int | None, PARALLEL] = None,
) -> None:
    """Run and supervise this host's workers for a farm elsewhere (FARM_BROKER_URL)."""
    if not get_settings().broker_url:
        from farm.errors import ConfigError

        raise ConfigError(
            "farm fleet joins an existing farm: set FARM_BROKER_URL (and FARM_DATABASE_URL) "
            "to its servers, or use `farm up` for a farm on this machine alone"
        )
    _run_farm(model, profile, None, False, grace, None, parallel)  # the farm's own gateway


def _run_farm(
    model: list[str] | None,
    profile: str | None,
    ask: str | None,
    once: bool,
    grace: float,
    port: int | None,
    parallel: int | None,
) -> None:
    from farm.catalog import worker_parallel
    from farm.cli.gateway import listen
    from farm.context import reset_context
    from farm.embedded import DEFAULT_MODEL, EmbeddedFarm

    settings = get_settings()
    models = list(model or [])
    catalog = None
    if profile is not None:
        from farm.catalog import load_catalog

        path = settings.resolved_models_file()
        catalog, _ = load_catalog(path, settings.model_dirs)
        if profile not in catalog.profiles:
            from farm.errors import InvalidRequest

            known = ", ".join(catalog.profiles) or "none"
            raise InvalidRequest(f"no profile '{profile}' in {path}; profiles there: {known}")
        models += [m for m in catalog.profiles[profile].models if m not in models]
    farm_ = EmbeddedFarm(
        settings, models or [DEFAULT_MODEL], say=lambda m: err.print(m, highlight=False)
    )
    farm_.catalog = catalog
    farm_.grace = grace
    # Slots per worker: --parallel, else the models file's `parallel` for its model.
    farm_.parallel = worker_parallel(settings.resolved_models_file(), farm_.models)
    if parallel is not None:
        farm_.parallel = dict.fromkeys(farm_.models, parallel)
    farm_.refuse_if_running()
    # The gateway's port first: taken, the farm does not start (rather than run without it).
    gateway_socket = listen("127.0.0.1", port) if port else None

    def _term(*_: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _term)
    # Started with `farm up &` from a script or cron, a shell hands it SIGINT ignored:
    # take Ctrl-C back, so that `farm down` and a terminal's Ctrl-C both stop it.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    services: list[Any] = []
    answering: Any = None
    try:
        farm_.start()
        os.environ["FARM_BROKER_URL"] = farm_.broker_url
        reset_context()
        answering = _answer_local_commands(farm_)
        if port is not None:
            services = _start_services(gateway_socket)
        err.print('[green]farm is up[/]: try `farm submit "Why is the sky blue?"` in another shell')
        if ask is not None:
            from farm.enqueue import build, submit_request

            job = submit_request(build(ask, model=farm_.models[0]))
            follow(job, as_json=False, timeout=None)
            if once:
                return
        farm_.watch()
    except KeyboardInterrupt:
        err.print(
            f"stopping: workers finish the jobs they run (up to {grace:g}s; Ctrl-C again to "
            "stop now, putting them back in the queue)"
        )
    finally:
        for stop in services:
            try:
                stop()
            except KeyboardInterrupt:  # Ctrl-C again: hurry the workers, skip no stop
                grace = 0.0
        farm_.stop(grace)
        if answering is not None:  # last: `farm status` answers at once while workers drain
            answering()
        if gateway_socket is not None:
            gateway_socket.close()
        err.print("farm stopped")


def _answer_local_commands(farm_: Any) -> Any:
    """Answer this machine's `farm status` and `farm status JOB` from this process
    (farm.local); returns how to stop."""
    from farm.local import serve
    from farm.status import fleet_status, job_status

    stop, address = serve({"/status": fleet_status, "/jobs/": job_status})
    farm_.advertise(address)
    return stop


def _start_services(gateway_socket: Any) -> list[Any]:
    """The batch feeder and the gateway on its socket (none: no gateway); returns how to
    stop each."""
    from farm.batches.feeder import start_feeder
    from farm.cli.gateway import base_url, key_note, keys_exist, start_gateway

    thread, feeding = start_feeder()

    def stop_feeder() -> None:
        feeding.set()
        thread.join(5)

    stops: list[Any] = [stop_feeder]
    if gateway_socket is not None:
        host, port = gateway_socket.getsockname()[:2]
        server = start_gateway(gateway_socket)
        err.print(f"gateway  {base_url(host, port)} ({key_note(keys_exist())})", highlight=False)
        # First: it takes no more requests while the rest stops.
        stops.insert(0, lambda: setattr(server, "should_exit", True))
    return stops


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
@friendly
def worker(ctx: typer.Context) -> None:
    """Serve models' queues: `farm worker --model NAME` (see `farm worker --help`; needs the worker extra)."""
    if importlib.util.find_spec("llama_cpp") is None:
        err.print(
            "error: the worker needs llama-cpp-python: `pip install 'farm[worker]'` "
            '(with CMAKE_ARGS="-DGGML_CUDA=on" for NVIDIA GPUs)'
        )
        raise typer.Exit(1)
    # farm never imports workers/: the worker runs as its own program.
    os.execv(sys.executable, [sys.executable, "-m", "workers", *_with_parallel(ctx.args)])


def _with_parallel(args: list[str]) -> list[str]:
    """The worker's arguments, plus `--parallel N` when they name none and the models file
    sets `parallel` for the models served (one worker has one slot count for them all)."""
    import argparse

    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--model", action="append", default=[])
    parser.add_argument("--models", default="")
    parser.add_argument("--parallel")
    parser.add_argument("-h", "--help", action="store_true")
    known, _ = parser.parse_known_args(args)
    if known.parallel is not None or known.help:
        return args
    models = list(dict.fromkeys(known.model + [m for m in known.models.split(",") if m]))
    from farm.catalog import worker_parallel

    path = get_settings().resolved_models_file()
    slots = worker_parallel(path, models)
    if not slots:
        return args
    if len(set(slots.values())) > 1 or len(slots) < len(models):
        from farm.errors import InvalidRequest

        asked = ", ".join(f"{m} {slots.get(m, 'none (the default)')}" for m in models)
        raise InvalidRequest(
            f"{path} sets different `parallel` for the models of this worker ({asked}), and "
            "one worker runs one slot count for all its models: pass --parallel N, or serve "
            "them from separate workers"
        )
    return [*args, "--parallel", str(next(iter(slots.values())))]


@app.command()
@friendly
def flower(
    port: Annotated[int, typer.Option(help="port to serve Flower on")] = 5555,
    address: Annotated[str, typer.Option(help="address to bind")] = "127.0.0.1",
) -> None:
    """Flower on this farm's broker, with the same transport options and basic auth."""
    from farm.context import get_context

    settings = get_settings()
    args = ["flower", f"--port={port}", f"--address={address}"]
    if settings.flower_password:
        args.append(f"--basic-auth={settings.flower_user}:{settings.flower_password}")
    elif address not in ("127.0.0.1", "localhost"):
        raise typer.BadParameter("set FARM_FLOWER_PASSWORD before serving Flower beyond localhost")
    get_context().app.start(args)


@app.command()
@friendly
def status(
    job_id: Annotated[str | None, typer.Argument(metavar="JOB_ID", help="a job to show")] = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
    gateway: Annotated[
        str | None,
        typer.Option(
            "--gateway",
            metavar="URL",
            help="ask this farm's gateway, with an admin key (--key or FARM_API_KEY), instead "
            "of its registry and broker (default: FARM_GATEWAY_URL)",
        ),
    ] = None,
    key: Annotated[
        str | None, typer.Option("--key", help="the admin key for --gateway (or FARM_API_KEY)")
    ] = None,
) -> None:
    """Models, workers, leases and queue depth; or one job's state and queue position."""
    settings = get_settings()
    gateway = gateway or settings.gateway_url
    if gateway:
        from farm.remote import gateway_status

        if key is None and settings.api_key is not None:
            key = settings.api_key.get_secret_value()
        remote = gateway_status(gateway, key, job_id)
        if as_json:
            print(json.dumps(remote, indent=2, default=str))
        elif job_id is not None:
            render_job(remote, out)
        else:
            render_fleet(remote, out)
        return
    from farm.local import ask  # a `farm up` here has the answers' libraries loaded already

    if job_id is not None:
        from urllib.parse import quote

        info = ask(f"/jobs/{quote(job_id, safe='')}")
        if info is None or info.get("job") != job_id:
            from farm.status import job_status

            info = job_status(job_id)
        if as_json:
            print(json.dumps(info, indent=2))
        else:
            render_job(info, out)
        return
    fleet = ask("/status")
    if fleet is None or not {"models", "workers"} <= fleet.keys():
        from farm.status import fleet_status

        fleet = fleet_status()
    if as_json:
        print(json.dumps(fleet, indent=2, default=str))
    else:
        render_fleet(fleet, out)


def render_job(info: dict[str, Any], console: Any) -> None:
    """`farm status JOB`: one labelled line per fact, times local with their zone."""
    from datetime import datetime

    from farm.cli.ops import local_time

    labels = {"duration_s": "duration", "cached_tokens": "cached tokens",
              "finish_reason": "finish reason", "starts_in_s": "starts in"}  # fmt: skip
    for key, value in info.items():
        if key in ("submitted", "started", "finished"):
            at = datetime.fromisoformat(value)
            value = f"{local_time(at)} {at.astimezone().strftime('%Z')}"
        elif key in ("prompt_tokens", "completion_tokens"):
            if key == "completion_tokens" and "prompt_tokens" in info:
                continue  # shown on the prompt's line
            counts = [f"{info['prompt_tokens']} prompt"] if "prompt_tokens" in info else []
            counts.append(f"{info.get('completion_tokens', 0)} completion")
            key, value = "tokens", ", ".join(counts)
            if info["status"] == "running":
                value += " so far"
        elif key == "ahead":
            value = ", ".join(f"{n} {p}" for p, n in value.items() if n) or "none"
        elif key == "starts_in_s":
            value = f"about {value:.0f}s" if value >= 1 else "under a second"
        elif key == "duration_s":
            value = f"{value:.1f}s"
        console.print(f"{labels.get(key, key):>14}  {value}", highlight=False)


def _render_sessions(rows: list[dict[str, Any]], console: Any) -> None:
    from farm.fair.share import WINDOW_S

    table = fold_table(
        "session",
        "weight",
        "queued",
        f"jobs ({WINDOW_S // 60} min)",
        f"tokens ({WINDOW_S // 60} min)",
        "share",
        title="sessions (fair share: input + weighted output tokens served lately)",
        whole=("session",),
    )
    for row in rows:
        table.add_row(
            row["session"],
            f"{row['weight']:g}",
            str(row["queued"]),
            str(row["served_jobs"]),
            str(row["served_tokens"]),
            f"{100 * row['share']:.0f}%",
        )
    console.print(table)


def render_fleet(fleet: dict[str, Any], console: Any) -> None:
    from farm.queue import PRIORITIES

    models = fold_table(
        "model",
        "loaded on",
        "on demand",
        *(f"queued {p}" for p in PRIORITIES),
        title="models",
        whole=("model", "loaded on", "on demand"),
    )
    for m in fleet["models"]:
        models.add_row(
            m["name"],
            ", ".join(m["workers"]) or ("-" if m["on_demand"] else "[red]none[/]"),
            ", ".join(m["on_demand"]) or "-",
            *(str(m["queued"][p]) for p in PRIORITIES),
        )
    console.print(models)
    # A worker's id names its host unless it was given another: then show the host.
    hosts = any(not w["id"].endswith(f"@{w['host']}") for w in fleet["workers"])
    workers = fold_table(
        "worker",
        *(["host"] if hosts else []),
        "device",
        "state",
        "loaded",
        "slots busy",
        "tok/s",
        "threads",
        "up",
        "heartbeat",
        title="workers",
        whole=("worker", "loaded"),
    )
    for w in fleet["workers"]:
        workers.add_row(
            w["id"],
            *([w["host"]] if hosts else []),
            w["device"],
            w["state"],
            ", ".join(w["models"]),
            f"{w['slots_busy']}/{w['slots']}",
            "-" if w["tokens_per_s"] is None else f"{w['tokens_per_s']:g}",
            str(w["threads"]),
            f"{w['uptime_s']}s",
            f"{w['heartbeat_age_s']}s ago",
        )
    console.print(workers)
    if fleet.get("sessions"):
        _render_sessions(fleet["sessions"], console)
    for b in fleet.get("batches", []):  # one whole line each: ids to copy
        eta = "" if b["eta_s"] is None else f", about {b['eta_s']:.0f}s left"
        console.print(
            f"batch {b['id']}  {b['name']}  {b['status']}  "
            f"{b['succeeded'] + b['failed']}/{b['total']} ended ({b['failed']} not ok), "
            f"{b['queued']} queued or running, {b['pending']} waiting, {b['priority']}{eta}",
            highlight=False,
            soft_wrap=True,
        )
