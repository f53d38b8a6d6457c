"""The `farm` command line: submit and follow jobs, run workers and the embedded farm,
manage models, read usage.

Every error a user can cause is printed as one line saying what was wrong and what to do,
with exit status 1; nothing is half-queued.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import signal
import sys
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Annotated, Any, TypeVar

import redis
import typer
from kombu.exceptions import OperationalError as KombuOperationalError
from rich.console import Console
from rich.table import Table

from farm.config import get_settings
from farm.errors import FarmError

app = typer.Typer(
    help="farm: an inference farm for llama.cpp models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)
models_app = typer.Typer(help="Register, list and remove models.", no_args_is_help=True)
db_app = typer.Typer(help="The registry's schema.", no_args_is_help=True)
app.add_typer(models_app, name="models")
app.add_typer(db_app, name="db")

# soft_wrap: piped output keeps ids and paths whole instead of folding at 80 columns.
out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)
F = TypeVar("F", bound=Callable[..., Any])


def friendly(fn: F) -> F:
    """Turn farm's errors into one clear line and exit status 1."""

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except FarmError as e:
            message = str(e)
        except (redis.RedisError, KombuOperationalError, ConnectionError) as e:
            message = f"cannot reach the farm's Redis: {e}; is `farm up` running, or FARM_BROKER_URL right?"
        err.print(f"[bold red]error:[/] {message}", markup=True, highlight=False, soft_wrap=True)
        raise typer.Exit(1)

    return wrapper  # type: ignore[return-value]


def _db_url() -> str:
    return get_settings().existing_database_url()


# -- jobs -----------------------------------------------------------------------------------------
Priority = Annotated[str, typer.Option("--priority", "-p", help="high, normal or low")]


@app.command()
@friendly
def submit(
    prompt: Annotated[str, typer.Argument(help="the prompt ('-' reads it from stdin)")],
    model: Annotated[str | None, typer.Option("--model", "-m", help="model name")] = None,
    priority: Priority = "normal",
    session: Annotated[str, typer.Option(help="session the usage is billed to")] = "default",
    chat: Annotated[bool, typer.Option("--chat", help="send the prompt as a chat message")] = False,
    system: Annotated[str | None, typer.Option(help="system message (implies --chat)")] = None,
    max_tokens: Annotated[int | None, typer.Option(help="most tokens to generate")] = None,
    max_time_ms: Annotated[int | None, typer.Option(help="stop generating after this long")] = None,
    stop: Annotated[list[str] | None, typer.Option(help="stop string (repeatable)")] = None,
    temperature: Annotated[float | None, typer.Option()] = None,
    top_p: Annotated[float | None, typer.Option()] = None,
    top_k: Annotated[int | None, typer.Option()] = None,
    min_p: Annotated[float | None, typer.Option()] = None,
    typical_p: Annotated[float | None, typer.Option()] = None,
    repeat_penalty: Annotated[float | None, typer.Option()] = None,
    presence_penalty: Annotated[float | None, typer.Option()] = None,
    frequency_penalty: Annotated[float | None, typer.Option()] = None,
    penalty_last_n: Annotated[int | None, typer.Option()] = None,
    mirostat_mode: Annotated[int | None, typer.Option()] = None,
    mirostat_tau: Annotated[float | None, typer.Option()] = None,
    mirostat_eta: Annotated[float | None, typer.Option()] = None,
    seed: Annotated[int | None, typer.Option()] = None,
    no_wait: Annotated[bool, typer.Option("--no-wait", help="print the job id and return")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="print the Completion as JSON")] = False,
    wait_for_worker: Annotated[
        float, typer.Option(help="seconds to wait for a worker to serve the model")
    ] = 0.0,
    timeout: Annotated[float | None, typer.Option(help="seconds to wait for the result")] = None,
) -> None:
    """Queue a prompt; print its tokens as they are generated."""
    from farm.enqueue import build, submit_request

    text = sys.stdin.read() if prompt == "-" else prompt
    params = {
        "max_tokens": max_tokens,
        "max_time_ms": max_time_ms,
        "stop": stop or None,
        "temperature": temperature,
        "top_p": top_p,
        "top_k": top_k,
        "min_p": min_p,
        "typical_p": typical_p,
        "repeat_penalty": repeat_penalty,
        "presence_penalty": presence_penalty,
        "frequency_penalty": frequency_penalty,
        "penalty_last_n": penalty_last_n,
        "mirostat_mode": mirostat_mode,
        "mirostat_tau": mirostat_tau,
        "mirostat_eta": mirostat_eta,
        "seed": seed,
    }
    common = {
        "model": model or get_settings().default_model,
        "priority": priority,
        "session": session,
        **params,
    }
    if chat or system:
        messages = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": text}
        ]
        request = build(None, messages=messages, **common)
    else:
        request = build(text, **common)
    job = submit_request(request, wait_for_worker=wait_for_worker)
    if no_wait:
        print(job.id)
        return
    signal.signal(signal.SIGTERM, _interrupt)  # killed while following: cancel, as Ctrl-C does
    _follow(job, as_json=as_json, timeout=timeout)


def _interrupt(*_: Any) -> None:
    raise KeyboardInterrupt


def _follow(
    job: Any, *, as_json: bool, timeout: float | None, cancel_on_interrupt: bool = True
) -> None:
    """Stream a job's tokens to stdout (or wait and print JSON).

    Ctrl-C cancels the job when this command submitted it; `farm result` only stops waiting.
    """
    try:
        if as_json:
            completion = job.result(timeout)
            print(completion.model_dump_json(indent=2))
            return
        wrote = False
        try:
            for piece in job.stream(timeout):
                sys.stdout.write(piece)
                sys.stdout.flush()
                wrote = True
        finally:
            if wrote:
                sys.stdout.write("\n")
                sys.stdout.flush()
        c = job.completion
        err.print(
            f"[dim]{c.job_id} · {c.usage.prompt_tokens}+{c.usage.completion_tokens} tokens · "
            f"{c.finish_reason} · wait {c.timings.queue_wait_ms:.0f} ms · "
            f"{c.timings.generation_ms:.0f} ms on {c.worker}[/]",
            highlight=False,
        )
    except KeyboardInterrupt:
        if not cancel_on_interrupt:
            err.print(
                f"\nstopped waiting; job {job.id} goes on (`farm cancel {job.id}` stops it)",
                highlight=False,
            )
            raise typer.Exit(130) from None
        # The user gave up on the answer: stop the generation instead of letting it burn on.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        cancelled = False
        with contextlib.suppress(FarmError):
            cancelled = job.cancel()
        err.print(
            f"\n[yellow]interrupted[/]: job {job.id} "
            + ("cancelled" if cancelled else "had already ended"),
            highlight=False,
        )
        raise typer.Exit(130) from None


@app.command()
@friendly
def result(
    job_id: str,
    as_json: Annotated[bool, typer.Option("--json")] = False,
    timeout: Annotated[float | None, typer.Option(help="seconds to wait")] = None,
) -> None:
    """Wait for a job and print its text (or its Completion as JSON)."""
    import farm

    _follow(farm.job(job_id), as_json=as_json, timeout=timeout, cancel_on_interrupt=False)


@app.command()
@friendly
def cancel(job_id: str) -> None:
    """Cancel a job: a queued one never runs; a running one stops at its next token."""
    import farm

    if farm.job(job_id).cancel():
        out.print(f"cancelled {job_id}")
    else:
        out.print(f"job {job_id} had already ended; nothing to cancel")


# -- the farm -----------------------------------------------------------------------------------
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
) -> None:
    """Start a whole farm here: broker, registry and one worker per model. Ctrl-C stops it.

    With FARM_BROKER_URL set, no broker is started: the workers join that farm."""
    _run_farm(model, profile, ask, once, grace)


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
) -> None:
    """Run and supervise this host's workers for a farm elsewhere (FARM_BROKER_URL)."""
    if not get_settings().broker_url:
        from farm.errors import ConfigError

        raise ConfigError(
            "farm fleet joins an existing farm: set FARM_BROKER_URL (and FARM_DATABASE_URL) "
            "to its servers, or use `farm up` for a farm on this machine alone"
        )
    _run_farm(model, profile, None, False, grace)


def _run_farm(
    model: list[str] | None, profile: str | None, ask: str | None, once: bool, grace: float
) -> None:
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
    farm_.refuse_if_running()

    def _term(*_: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _term)
    try:
        farm_.start()
        os.environ["FARM_BROKER_URL"] = farm_.broker_url
        reset_context()
        err.print('[green]farm is up[/]: try `farm submit "Why is the sky blue?"` in another shell')
        if ask is not None:
            from farm.enqueue import build, submit_request

            job = submit_request(build(ask, model=farm_.models[0]))
            _follow(job, as_json=False, timeout=None)
            if once:
                return
        farm_.watch()
    except KeyboardInterrupt:
        err.print("stopping: workers finish their current job first")
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        farm_.stop(grace)
        err.print("farm stopped")


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def worker(ctx: typer.Context) -> None:
    """Serve models' queues: `farm worker --model NAME` (see `farm worker --help`; needs the worker extra)."""
    if importlib.util.find_spec("llama_cpp") is None:
        err.print(
            "error: the worker needs llama-cpp-python: `pip install 'farm[worker]'` "
            '(with CMAKE_ARGS="-DGGML_CUDA=on" for NVIDIA GPUs)'
        )
        raise typer.Exit(1)
    # farm never imports workers/: the worker runs as its own program.
    os.execv(sys.executable, [sys.executable, "-m", "workers", *ctx.args])


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
    job_id: Annotated[str | None, typer.Argument(help="a job to show")] = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Models, workers, leases and queue depth; or one job's state and queue position."""
    from farm.status import fleet_status, job_status, render_fleet

    if job_id is not None:
        info = job_status(job_id)
        if as_json:
            print(json.dumps(info, indent=2, default=str))
        else:
            for key, value in info.items():
                out.print(f"{key:>14}  {value}", highlight=False)
        return
    fleet = fleet_status()
    if as_json:
        print(json.dumps(fleet, indent=2, default=str))
    else:
        render_fleet(fleet, out)


# -- models, usage, db ----------------------------------------------------------------------------
@models_app.command("add")
@friendly
def models_add(
    name: str,
    path: Path,
    n_ctx: Annotated[int, typer.Option(help="context size in tokens")] = 4096,
    n_gpu_layers: Annotated[int, typer.Option(help="layers on the GPU (-1: all)")] = -1,
    chat_format: Annotated[
        str | None, typer.Option(help="llama-cpp-python chat format when the GGUF has no template")
    ] = None,
) -> None:
    """Register a GGUF file as a model."""
    from farm.errors import InvalidRequest
    from farm.registry import queries, transaction
    from farm.request import MODEL_NAME_RE, MODEL_NAME_RULE

    if not MODEL_NAME_RE.match(name):
        raise InvalidRequest(f"invalid model name '{name}': model names are {MODEL_NAME_RULE}")
    from farm.catalog import confine

    path = confine(path, get_settings().model_dirs)
    if not path.is_file():
        raise InvalidRequest(f"no file at {path}; give the path of a .gguf file")
    from farm.catalog import default_chat_format
    from farm.gguf_info import read_gguf_info

    info = read_gguf_info(path)  # InvalidRequest when it is not a GGUF
    if n_ctx < 16:
        raise InvalidRequest(f"invalid --n-ctx {n_ctx}: give at least 16 tokens")
    if info.context_length and n_ctx > info.context_length:
        raise InvalidRequest(
            f"invalid --n-ctx {n_ctx}: {path.name} was trained for {info.context_length} tokens; "
            f"give at most {info.context_length}"
        )
    if chat_format is None:
        chat_format = default_chat_format(info)
        if chat_format is None and not info.has_chat_template:
            err.print(
                f"note: {path.name} has no chat template; chat requests need --chat-format "
                "(a llama-cpp-python format such as chatml)",
                highlight=False,
            )
    with transaction(_db_url()) as s:
        queries.add_model(
            s,
            name=name,
            path=str(path.resolve()),
            n_ctx=n_ctx,
            n_gpu_layers=n_gpu_layers,
            chat_format=chat_format,
        )
    out.print(f"added model {name} ({path}); serve it with `farm worker --model {name}`")


@models_app.command("apply")
@friendly
def models_apply(
    file: Annotated[
        Path | None, typer.Argument(help="models file (default FARM_MODELS_FILE)")
    ] = None,
) -> None:
    """Register or update every model of a models file; nothing is applied if it has errors."""
    from farm.catalog import apply_catalog, load_catalog

    settings = get_settings()
    catalog, _ = load_catalog(file or settings.resolved_models_file(), settings.model_dirs)
    added, updated = apply_catalog(_db_url(), catalog)
    out.print(
        f"added: {', '.join(added) or 'none'}; updated: {', '.join(updated) or 'none'}; "
        f"profiles: {', '.join(catalog.profiles) or 'none'}"
    )


@models_app.command("scan")
@friendly
def models_scan(
    folder: Path,
    add: Annotated[bool, typer.Option("--add", help="register the files found")] = False,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Find GGUF files under a folder and show what they say about themselves."""
    from dataclasses import asdict

    from farm.catalog import confine, default_chat_format, scan, suggest_name
    from farm.registry import queries, transaction

    folder = confine(folder, get_settings().model_dirs)
    found, skipped = scan(folder)
    for reason in skipped:
        err.print(f"skipped: {reason}", highlight=False)
    if not found:
        err.print(f"no GGUF files found under {folder}")
    if as_json:
        print(
            json.dumps([asdict(i) | {"name": suggest_name(Path(i.path))} for i in found], indent=2)
        )
    else:
        table = Table(
            "name", "architecture", "params", "quant", "context", "template", "size", "path"
        )
        for i in found:
            table.add_row(
                suggest_name(Path(i.path)),
                i.architecture or "?",
                i.size_label or f"{i.parameters / 1e9:.2f}B",
                i.quantization or "?",
                str(i.context_length or "?"),
                "yes" if i.has_chat_template else "no",
                f"{i.file_bytes / 1024**2:.0f} MiB",
                i.path,
            )
        out.print(table)
    if add:
        with transaction(_db_url()) as s:
            known = {m.name for m in queries.list_models(s)}
            for i in found:
                name = suggest_name(Path(i.path))
                if name in known:
                    continue
                n_ctx = min(i.context_length or 4096, 8192)
                chat_format = default_chat_format(i)
                queries.add_model(s, name=name, path=i.path, n_ctx=n_ctx, chat_format=chat_format)
                out.print(
                    f"added {name} (context {n_ctx}, chat: {chat_format or 'its own template'})"
                )


@models_app.command("list")
@friendly
def models_list(as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """List registered models and how many workers serve each."""
    from farm.registry import queries, transaction

    with transaction(_db_url()) as s:
        rows: list[dict[str, Any]] = [
            {
                "name": m.name,
                "path": m.path,
                "n_ctx": m.n_ctx,
                "chat_format": m.chat_format,
                "workers": len(queries.live_leases(s, m.name)),
            }
            for m in queries.list_models(s)
        ]
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    table = Table("model", "context", "chat format", "workers", "path")
    for r in rows:
        table.add_row(
            r["name"], str(r["n_ctx"]), r["chat_format"] or "(GGUF's)", str(r["workers"]), r["path"]
        )
    out.print(table)


@models_app.command("load")
@friendly
def models_load(
    name: str,
    worker: Annotated[str, typer.Option(help="worker id (see `farm status`)")],
    timeout: Annotated[float, typer.Option(help="seconds to wait for the worker")] = 60.0,
) -> None:
    """Load a model on a running worker (evicting least recently used ones to fit)."""
    from farm.control import steer

    answer = steer("load", name, worker, timeout=timeout)
    out.print(f"{worker}: {answer['ok']}; loaded now: {', '.join(answer['loaded'])}")


@models_app.command("unload")
@friendly
def models_unload(
    name: str,
    worker: Annotated[str, typer.Option(help="worker id (see `farm status`)")],
    timeout: Annotated[float, typer.Option(help="seconds to wait for the worker")] = 60.0,
) -> None:
    """Free a model's memory on a worker (it loads again when a job needs it)."""
    from farm.control import steer

    answer = steer("unload", name, worker, timeout=timeout)
    out.print(f"{worker}: {answer['ok']}; loaded now: {', '.join(answer['loaded']) or 'none'}")


@models_app.command("remove")
@friendly
def models_remove(name: str) -> None:
    """Remove a model from the registry (its usage history stays)."""
    from farm.registry import queries, transaction

    with transaction(_db_url()) as s:
        queries.remove_model(s, name)
    out.print(f"removed model {name}")


@app.command()
@friendly
def usage(
    session: Annotated[str | None, typer.Option(help="only this session")] = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Jobs and tokens per session and model."""
    from dataclasses import asdict

    from farm.registry import queries, transaction

    with transaction(_db_url()) as s:
        totals = queries.usage_totals(s, session=session)
    if as_json:
        print(json.dumps([asdict(t) for t in totals], indent=2))
        return
    if not totals:
        where = f" for session '{session}'" if session else ""
        out.print(f"no usage recorded{where} yet")
        return
    table = Table(
        "session", "model", "jobs", "ok", "failed", "prompt tok", "completion tok", "gen s"
    )
    for t in totals:
        table.add_row(
            t.session,
            t.model,
            str(t.jobs),
            str(t.succeeded),
            str(t.failed),
            str(t.prompt_tokens),
            str(t.completion_tokens),
            f"{t.generation_ms / 1000:.1f}",
        )
    out.print(table)


@db_app.command("upgrade")
@friendly
def db_upgrade(revision: Annotated[str, typer.Argument()] = "head") -> None:
    """Create or migrate the registry's tables (Alembic)."""
    from farm.registry.db import current_revision, upgrade

    url = get_settings().resolved_database_url()
    upgrade(url, revision)
    out.print(f"registry at revision {current_revision(url)}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
