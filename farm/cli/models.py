"""`farm models ...`, `farm usage`, `farm db upgrade`: the registry from the command line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from farm.cli.base import (
    _db_url,
    _db_url_for_writes,
    app,
    db_app,
    err,
    fold_table,
    friendly,
    get_settings,
    models_app,
    out,
)

ModelName = Annotated[str, typer.Argument(metavar="NAME", help="the model's name")]


@models_app.command("add")
@friendly
def models_add(
    name: ModelName,
    path: Annotated[Path, typer.Argument(metavar="FILE", help="the GGUF file")],
    n_ctx: Annotated[int, typer.Option(help="context size in tokens")] = 4096,
    n_gpu_layers: Annotated[int, typer.Option(help="layers on the GPU (-1: all)")] = -1,
    chat_format: Annotated[
        str | None, typer.Option(help="llama-cpp-python chat format when the GGUF has no template")
    ] = None,
    embedding: Annotated[
        bool | None,
        typer.Option(
            "--embedding/--no-embedding",
            help="serve POST /v1/embeddings (default: when the GGUF has a pooling type)",
        ),
    ] = None,
    pooling: Annotated[
        str | None, typer.Option(help="embedding pooling: mean, cls or last (default: the GGUF's)")
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
    if pooling is not None and pooling not in ("mean", "cls", "last"):
        raise InvalidRequest(f"invalid --pooling {pooling!r}: give mean, cls or last")
    with transaction(_db_url_for_writes()) as s:
        queries.add_model(
            s,
            name=name,
            path=str(path.resolve()),
            n_ctx=n_ctx,
            n_gpu_layers=n_gpu_layers,
            chat_format=chat_format,
            embedding=bool(info.pooling or pooling) if embedding is None else embedding,
            pooling=pooling,
        )
    out.print(f"added model {name} ({path}); serve it with `farm worker --model {name}`")


@models_app.command("apply")
@friendly
def models_apply(
    file: Annotated[
        Path | None, typer.Argument(metavar="FILE", help="models file (default FARM_MODELS_FILE)")
    ] = None,
) -> None:
    """Register or update every model of a models file; nothing is applied if it has errors."""
    from farm.catalog import apply_catalog, load_catalog

    settings = get_settings()
    catalog, _ = load_catalog(file or settings.resolved_models_file(), settings.model_dirs)
    added, updated = apply_catalog(_db_url_for_writes(), catalog)
    out.print(
        f"added: {', '.join(added) or 'none'}; updated: {', '.join(updated) or 'none'}; "
        f"profiles: {', '.join(catalog.profiles) or 'none'}"
    )


@models_app.command("scan")
@friendly
def models_scan(
    folder: Annotated[Path, typer.Argument(metavar="FOLDER")],
    add: Annotated[bool, typer.Option("--add", help="register the files found")] = False,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Find GGUF files under a folder and show what they say about themselves."""
    from dataclasses import asdict

    from farm.catalog import confine, default_chat_format, scan, suggest_name
    from farm.registry import queries, transaction

    roots = get_settings().model_dirs
    folder = confine(folder, roots)
    found, skipped = scan(folder, roots)
    for reason in skipped:
        err.print(f"skipped: {reason}", highlight=False)
    if not found:
        err.print(f"no GGUF files found under {folder}")
    if as_json:
        print(
            json.dumps([asdict(i) | {"name": suggest_name(Path(i.path))} for i in found], indent=2)
        )
    else:
        table = fold_table(
            "name",
            "architecture",
            "params",
            "quant",
            "context",
            "template",
            "size",
            "path",
            whole=("name", "path"),
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
        with transaction(_db_url_for_writes()) as s:
            known = {m.name for m in queries.list_models(s)}
            for i in found:
                name = suggest_name(Path(i.path))
                if name in known:
                    continue
                n_ctx = min(i.context_length or 4096, 8192)
                chat_format = default_chat_format(i)
                queries.add_model(
                    s,
                    name=name,
                    path=i.path,
                    n_ctx=n_ctx,
                    chat_format=chat_format,
                    embedding=i.pooling is not None,
                )
                out.print(
                    f"added {name} (context {n_ctx}, chat: {chat_format or 'its own template'})"
                )


@models_app.callback()
def models_default(ctx: typer.Context) -> None:
    """`farm models` alone: the list (`farm models list`)."""
    if ctx.invoked_subcommand is None:
        models_list()


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
    table = fold_table(
        "model", "context", "chat format", "workers", "path", whole=("model", "path")
    )
    for r in rows:
        table.add_row(
            r["name"], str(r["n_ctx"]), r["chat_format"] or "(GGUF's)", str(r["workers"]), r["path"]
        )
    out.print(table)


WorkerOption = Annotated[str, typer.Option(help="worker id (see `farm status`)")]
TimeoutOption = Annotated[float, typer.Option(help="seconds to wait for the worker")]


def _steer(action: str, name: str, worker: str, timeout: float) -> None:
    from farm.control import steer

    answer = steer(action, name, worker, timeout=timeout)
    out.print(f"{worker}: {answer['ok']}; loaded now: {', '.join(answer['loaded']) or 'none'}")


@models_app.command("load")
@friendly
def models_load(name: ModelName, worker: WorkerOption, timeout: TimeoutOption = 60.0) -> None:
    """Load a model on a running worker (evicting least recently used ones to fit)."""
    _steer("load", name, worker, timeout)


@models_app.command("unload")
@friendly
def models_unload(name: ModelName, worker: WorkerOption, timeout: TimeoutOption = 60.0) -> None:
    """Free a model's memory on a worker (it loads again when a job needs it)."""
    _steer("unload", name, worker, timeout)


@models_app.command("remove")
@friendly
def models_remove(name: ModelName) -> None:
    """Remove a model from the registry (its usage history stays)."""
    from farm.registry import queries, transaction

    with transaction(_db_url()) as s:
        queries.remove_model(s, name)
    out.print(f"removed model {name}")


@app.command()
@friendly
def usage(
    session: Annotated[str | None, typer.Option(metavar="NAME", help="only this session")] = None,
    batch: Annotated[
        str | None, typer.Option(metavar="BATCH", help="only this batch's lines (id or name)")
    ] = None,
    jobs: Annotated[
        bool, typer.Option("--jobs", help="one line per job instead of totals (for billing)")
    ] = False,
    since: Annotated[
        str | None,
        typer.Option(metavar="DATE", help="with --jobs: jobs submitted since, e.g. 2026-11-01"),
    ] = None,
    as_csv: Annotated[bool, typer.Option("--csv", help="with --jobs: CSV with a header")] = False,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Jobs and tokens per session and model; or, with --jobs, every job on its own line."""
    from dataclasses import asdict

    from farm.registry import queries, transaction

    if jobs:
        _usage_per_job(session, batch, since, as_csv, as_json)
        return

    with transaction(_db_url()) as s:
        if batch is not None:
            from farm.batches.store import get

            batch = get(s, batch).id
        totals = queries.usage_totals(s, session=session, batch=batch)
    if as_json:
        print(json.dumps([asdict(t) for t in totals], indent=2))
        return
    if not totals:
        where = f" for session '{session}'" if session else ""
        where += f" for batch {batch}" if batch else ""
        out.print(f"no usage recorded{where} yet")
        return
    table = fold_table(
        "session",
        "model",
        "jobs",
        "succeeded",
        "failed",
        "cancelled",
        "expired",
        "in flight",
        "prompt tok",
        "completion tok",
        "gen s",
        whole=("session", "model"),
    )
    for t in totals:
        table.add_row(
            t.session,
            t.model,
            str(t.jobs),
            str(t.succeeded),
            str(t.failed),
            str(t.cancelled),
            str(t.expired),
            str(t.pending),
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


JOB_COLUMNS = (
    "job_id", "session", "model", "priority", "status", "worker_id", "prompt_tokens",
    "cached_tokens", "completion_tokens", "queue_wait_ms", "ttft_ms", "generation_ms",
    "submitted_at", "started_at", "finished_at", "finish_reason",
)  # fmt: skip


def _usage_per_job(
    session: str | None, batch: str | None, since: str | None, as_csv: bool, as_json: bool
) -> None:
    import csv
    import sys
    from datetime import UTC, datetime

    from farm.errors import InvalidRequest
    from farm.registry import queries, transaction

    start = None
    if since is not None:
        try:
            start = datetime.fromisoformat(since)
        except ValueError:
            raise InvalidRequest(
                f"invalid --since '{since}': give a date or time like 2026-11-01 or "
                "2026-11-01T08:00"
            ) from None
        start = start if start.tzinfo else start.astimezone(UTC)
    with transaction(_db_url()) as s:
        if batch is not None:
            from farm.batches.store import get

            batch = get(s, batch).id
        rows = [
            {c: getattr(r, c) for c in JOB_COLUMNS}
            for r in queries.recent_jobs(s, session=session, since=start, batch=batch, limit=None)
        ]
    if as_json:
        print(json.dumps(rows, indent=2, default=str))
    elif as_csv:
        writer = csv.DictWriter(sys.stdout, fieldnames=JOB_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    else:
        table = fold_table(
            "job",
            "session",
            "model",
            "priority",
            "status",
            "tokens",
            "wait",
            "first token",
            "generation",
            whole=("job", "session", "model"),
        )
        for r in rows:
            table.add_row(
                r["job_id"],
                r["session"],
                r["model"],
                r["priority"],
                r["status"],
                f"{r['prompt_tokens']}+{r['completion_tokens']}",
                _ms(r["queue_wait_ms"]),
                _ms(r["ttft_ms"]),
                _ms(r["generation_ms"]),
            )
        out.print(table, highlight=False)


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}ms"
