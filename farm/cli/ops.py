"""`farm jobs`, `farm logs`, `farm down`, `farm config`, `farm metrics`: what an operator
reaches for once the farm runs."""

from __future__ import annotations

import json
import os
import signal
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import typer

from farm.cli.base import (
    JOB_STATUSES,
    _db_url,
    app,
    choice,
    err,
    fold_table,
    friendly,
    get_settings,
    out,
)


def local_time(dt: datetime | None) -> str:
    """A registry timestamp as short local time: 14:03:07, or 2026-11-23 14:03 if not today."""
    if dt is None:
        return "-"
    local = (dt if dt.tzinfo else dt.replace(tzinfo=UTC)).astimezone()
    if local.date() == datetime.now().astimezone().date():
        return local.strftime("%H:%M:%S")
    return local.strftime("%Y-%m-%d %H:%M")


@app.command()
@friendly
def jobs(
    session: Annotated[str | None, typer.Option(help="only this session's jobs")] = None,
    model: Annotated[str | None, typer.Option(help="only this model's jobs")] = None,
    status: Annotated[
        str | None,
        typer.Option(
            metavar="STATUS",
            parser=choice(JOB_STATUSES, "a job status"),
            help="queued, running, succeeded, failed, cancelled or expired",
        ),
    ] = None,
    limit: Annotated[int, typer.Option(min=1, max=10000, help="how many, newest first")] = 20,
    as_json: Annotated[bool, typer.Option("--json", help="one JSON object per job")] = False,
) -> None:
    """Recent jobs, newest first: a table, one line per job when piped."""
    from farm.registry import queries, transaction
    from farm.registry.tables import as_utc

    with transaction(_db_url()) as s:
        rows = queries.recent_jobs(s, session=session, model=model, status=status, limit=limit)
        known = [m.name for m in queries.list_models(s)] if model and not rows else []
        found: list[dict[str, Any]] = [
            {
                "job": r.job_id,
                "status": r.status,
                "model": r.model,
                "session": r.session,
                "priority": r.priority,
                "worker": r.worker_id,
                "prompt_tokens": r.prompt_tokens,
                "cached_tokens": r.cached_tokens,
                "completion_tokens": r.completion_tokens,
                "submitted": as_utc(r.submitted_at),  # printed as local time
                "duration_s": _duration(r.started_at, r.finished_at),
                "error": r.error,
            }
            for r in rows
        ]
    _tokens_so_far([j for j in found if j["status"] == "running"])
    if as_json:
        for job in found:
            print(json.dumps({**job, "submitted": job["submitted"].isoformat()}))
        return
    if not found:
        out.print("no jobs yet" + (" that match" if session or model or status else ""))
        if model and model not in known:  # a typo, or a model removed with no jobs left
            err.print(
                f"(no model '{model}' is registered; known: {', '.join(known) or 'none yet'})",
                highlight=False,
                markup=False,
            )
        return
    table = fold_table(
        "job",
        "status",
        "model",
        "session",
        "priority",
        "tokens",
        "took",
        "submitted",
        whole=("job", "model", "session"),
    )
    for j in found:
        if j["prompt_tokens"] is None:  # running: what it generated so far
            tokens = f"{j['completion_tokens']} so far"
        else:
            tokens = f"{j['prompt_tokens']}+{j['completion_tokens']}"
        table.add_row(
            j["job"],
            j["status"],
            j["model"],
            j["session"],
            j["priority"],
            tokens,
            "-" if j["duration_s"] is None else f"{j['duration_s']:.1f}s",
            local_time(j["submitted"]),
        )
    out.print(table, highlight=False)


def _tokens_so_far(running: list[dict[str, Any]]) -> None:
    """Running jobs' rows hold no counts until they end: take the tokens generated so far
    from their workers' progress keys (prompt_tokens None: not counted yet). Left as the
    registry has them when Redis cannot be reached (a farm that is down)."""
    if not running:
        return
    from farm.context import get_context
    from farm.status import tokens_so_far

    try:
        so_far = tokens_so_far(get_context(), [j["job"] for j in running])
    except Exception:  # no broker here now: the registry's view is all there is
        return
    for j, tokens in zip(running, so_far, strict=True):
        j["prompt_tokens"], j["completion_tokens"] = None, tokens


def _duration(started: datetime | None, finished: datetime | None) -> float | None:
    if started is None or finished is None:
        return None
    return round((finished - started).total_seconds(), 3)


@app.command()
@friendly
def logs(
    worker: Annotated[
        str | None, typer.Argument(metavar="[MODEL]", help="a worker's model; all when omitted")
    ] = None,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="keep printing new lines")] = False,
    lines: Annotated[int, typer.Option("--lines", "-n", min=0, help="lines from the end")] = 40,
) -> None:
    """The logs of the farm `farm up` runs here: its workers and its broker."""
    from farm.errors import InvalidRequest

    home = get_settings().home
    files = {
        p.name.removeprefix("worker-").removesuffix(".log"): p
        for p in sorted(home.glob("worker-*.log"))
    }
    broker = home / "broker" / "broker.log"
    if broker.exists():
        files["broker"] = broker
    if worker is not None:
        if worker not in files:
            known = ", ".join(files) or "none"
            raise InvalidRequest(f"no log for '{worker}' in {home}; logs there: {known}")
        files = {worker: files[worker]}
    if not files:
        raise InvalidRequest(f"no logs in {home}: `farm up` writes them there when it runs")
    for name, path in files.items():
        prefix = f"{name}: " if len(files) > 1 else ""
        for line in _last_lines(path, lines):
            out.print(prefix + line, highlight=False, markup=False)
    if follow:
        _follow(files)


def _last_lines(path: Path, n: int) -> list[str]:
    if n == 0:
        return []
    with path.open("rb") as f:
        f.seek(0, os.SEEK_END)
        size = f.tell()
        f.seek(max(0, size - 256 * n))
        text = f.read().decode("utf-8", "replace")
    return text.splitlines()[-n:]


def _follow(files: dict[str, Path]) -> None:
    handles = {name: path.open("rb") for name, path in files.items()}
    for f in handles.values():
        f.seek(0, os.SEEK_END)
    try:
        while True:
            quiet = True
            for name, f in handles.items():
                for raw in f.readlines():
                    quiet = False
                    line = raw.decode("utf-8", "replace").rstrip("\n")
                    prefix = f"{name}: " if len(handles) > 1 else ""
                    out.print(prefix + line, highlight=False, markup=False)
            if quiet:
                time.sleep(0.2)
    except KeyboardInterrupt:
        return


@app.command()
@friendly
def down(
    now: Annotated[
        bool, typer.Option("--now", help="do not wait for running jobs: put them back in the queue")
    ] = False,
    timeout: Annotated[float, typer.Option(help="seconds to wait for the farm to stop")] = 120.0,
) -> None:
    """Stop the farm that `farm up` runs here, as Ctrl-C in its shell would."""
    from farm.errors import FarmUnavailable
    from farm.local import read_state

    settings = get_settings()
    state = read_state(settings.state_file)
    if state is None:
        raise FarmUnavailable(f"no farm is running here ({settings.home}); nothing to stop")
    pid = int(str(state["pid"]))
    # SIGTERM: `farm up` stops on it as on Ctrl-C, and no shell starts a program with it
    # ignored (a script's `farm up &` gets SIGINT ignored).
    os.kill(pid, signal.SIGTERM)
    if now:
        time.sleep(0.5)
        os.kill(pid, signal.SIGTERM)  # the second Ctrl-C: stop at once, requeuing
    if now:
        what = "running jobs go back to the queue"
    else:
        grace = state.get("grace")
        within = f" within {grace:g}s" if isinstance(grace, int | float) else ""
        what = (
            f"running jobs may finish{within}; what cannot goes back to the queue (--now: at once)"
        )
    err.print(f"stopping the farm (pid {pid}): {what}", highlight=False)
    deadline = time.monotonic() + timeout
    while read_state(settings.state_file) is not None:
        if time.monotonic() > deadline:
            hint = (
                f"`kill -9 {pid}` ends it (its workers' jobs go back to the queue when it "
                "starts again)"
                if now
                else "`farm down --now` stops it without waiting for running jobs"
            )
            raise FarmUnavailable(
                f"the farm (pid {pid}) has not stopped after {timeout:g}s; {hint}"
            )
        time.sleep(0.2)
    err.print("farm stopped")


@app.command()
@friendly
def config(as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Every setting in effect, and where it came from (environment, farm up, default)."""
    from farm.config import Settings, masked
    from farm.local import read_state

    settings = get_settings()
    state = read_state(settings.state_file) or {}
    rows: list[dict[str, Any]] = []
    for name, field in Settings.model_fields.items():
        env = f"FARM_{name.upper()}"
        value: Any = getattr(settings, name)
        source = "environment" if env in os.environ else "default"
        if (
            name in ("broker_url", "result_url", "database_url")
            and value is None
            and state.get(name)
        ):
            value, source = state[name], f"the running farm ({settings.state_file})"
        if isinstance(value, str) and "://" in value:
            value = masked(value)
        rows.append(
            {
                "name": name,
                "env": env,
                "value": value,
                "source": source,
                "description": field.description or "",
            }
        )
    if as_json:
        print(json.dumps(rows, indent=2, default=str))
        return
    for r in rows:
        out.print(f"{r['env']}={r['value']}  ({r['source']})", highlight=False, markup=False)
        out.print(f"    {r['description']}", highlight=False, markup=False, style="dim")


@app.command()
@friendly
def metrics(
    port: Annotated[int, typer.Option(help="port to serve /metrics on")] = 9101,
    address: Annotated[str, typer.Option(help="address to bind")] = "127.0.0.1",
    once: Annotated[bool, typer.Option("--once", help="print one scrape and exit")] = False,
) -> None:
    """Prometheus metrics of the whole farm: queue depth, jobs, tokens, latencies, slots."""
    from farm.context import get_context
    from farm.metrics import render, serve

    ctx = get_context()
    if once:
        print(render(ctx).decode(), end="")
        return
    err.print(f"serving the farm's metrics on http://{address}:{port}/metrics (Ctrl-C stops)")
    try:
        serve(ctx, port, address)
    except KeyboardInterrupt:
        return
