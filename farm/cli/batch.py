"""`farm batch submit|list|status|wait|results|errors|cancel|feeder`: batch jobs, for cron.

Scriptable: `submit` prints the batch id alone on stdout (notes go to stderr) and returns at
once; every command takes --json. `wait` exits with what happened:

    0    completed, every line succeeded
    3    completed, some lines failed (see `farm batch errors`)
    4    cancelled or expired (lines that ran are kept)
    124  --timeout passed first (the batch goes on)
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from farm.cli.base import app, err, fold_table, friendly, out, priority_level

batch_app = typer.Typer(help="Batch jobs: a JSONL file of requests run in the background.")
app.add_typer(batch_app, name="batch", no_args_is_help=True)

EXIT_SOME_FAILED = 3
EXIT_NOT_COMPLETED = 4
EXIT_TIMEOUT = 124

BatchId = Annotated[str, typer.Argument(metavar="BATCH", help="the batch's id or name")]
AsJson = Annotated[bool, typer.Option("--json", help="the batch object as JSON")]


@batch_app.command("submit")
@friendly
def submit(
    file: Annotated[
        Path, typer.Argument(metavar="FILE", help="JSONL: one OpenAI batch request per line")
    ],
    name: Annotated[
        str | None,
        typer.Option(
            help="identifies the batch: a second submit under it queues nothing "
            "[default: the file's SHA-256]"
        ),
    ] = None,
    priority: Annotated[
        str, typer.Option(metavar="LEVEL", parser=priority_level, help="high, normal or low")
    ] = "low",
    session: Annotated[str, typer.Option(metavar="NAME", help="session billed")] = "default",
    window: Annotated[
        str, typer.Option(help="completion window: lines not started by then expire")
    ] = "24h",
    as_json: AsJson = False,
) -> None:
    """Check the file whole and queue it as a batch; prints the batch id."""
    import farm.batches as batches
    from farm.errors import BatchFileError

    try:
        batch, created = batches.submit(
            file, name=name, session=session, priority=priority, completion_window=window
        )
    except BatchFileError as e:  # every bad line, not the first few of the message
        first = str(e).splitlines()[0]
        err.print(f"[bold red]error:[/] {first}", markup=True, highlight=False)
        for line in e.errors:
            err.print(f"  {line}", markup=False, highlight=False)
        if e.total > len(e.errors):
            err.print(f"  ... and {e.total - len(e.errors)} more", highlight=False)
        raise typer.Exit(1) from None
    if created:
        err.print(f"batch {batch.name}: {batch.total} lines queued", highlight=False)
    else:
        same = batch.content_hash == _hash(file)
        err.print(
            f"batch {batch.name} exists ({batch.status}, {batch.done}/{batch.total} done): "
            "nothing queued again (another --name runs the file again)"
            + ("" if same else "; note: its file differed from this one"),
            highlight=False,
        )
    print(json.dumps(batch.to_json(), indent=2) if as_json else batch.id)


def _hash(file: Path) -> str:
    from farm.batches.lines import content_hash

    return content_hash(file.read_bytes())


@batch_app.command("list")
@friendly
def list_(
    limit: Annotated[int, typer.Option(help="newest first, at most this many")] = 20,
    session: Annotated[str | None, typer.Option(metavar="NAME", help="only this session")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="a list of batch objects")] = False,
) -> None:
    """The batches, newest first: id, name, status, lines by outcome, created."""
    import farm.batches as batches

    found = batches.listing(session=session, limit=limit)
    if as_json:
        print(json.dumps([b.to_json() for b in found], indent=2))
        return
    if not found:
        out.print("no batches yet: `farm batch submit FILE`")
        return
    table = fold_table(
        "batch", "name", "status", "ok", "not ok", "created", whole=("batch", "name")
    )
    for b in found:
        c = b.counts
        ended = ", ".join(f"{c[k]} {k}" for k in ("failed", "cancelled", "expired") if c.get(k))
        table.add_row(
            b.id,
            b.name,
            b.status,
            f"{b.succeeded}/{b.total}",
            ended or "-",
            f"{b.created_at.astimezone():%Y-%m-%d %H:%M}",
        )
    out.print(table, highlight=False)


@batch_app.command("status")
@friendly
def status(batch_id: BatchId, as_json: AsJson = False) -> None:
    """A batch's counts, progress and ETA."""
    import farm.batches as batches

    b = batches.get(batch_id)
    if as_json:
        print(json.dumps(b.to_json(), indent=2))
        return
    out.print(_describe(b), highlight=False)


def _describe(b: Any) -> str:
    c = b.counts
    eta = b.eta_s()
    lines = [
        f"batch     {b.id} ({b.name})",
        f"status    {b.status}",
        f"progress  {b.done}/{b.total} ended ({100 * b.done / max(b.total, 1):.0f}%): "
        f"{b.succeeded} succeeded, {c.get('failed', 0)} failed, {c.get('cancelled', 0)} "
        f"cancelled, {c.get('expired', 0)} expired; {c.get('queued', 0)} queued or running, "
        f"{c.get('pending', 0)} waiting",
        f"priority  {b.priority}, session {b.session}",
        f"created   {b.created_at:%Y-%m-%d %H:%M:%S} UTC, expires {b.expires_at:%Y-%m-%d %H:%M:%S} UTC",
    ]
    if eta is not None:
        lines.append(f"eta       {_duration(eta)} at the rate so far")
    if b.ended:
        if b.succeeded:
            lines.append(f"results   farm batch results {b.id} -o results.jsonl")
        if b.failed:
            lines.append(f"errors    farm batch errors {b.id} -o errors.jsonl")
    return "\n".join(lines)


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


@batch_app.command("wait")
@friendly
def wait(
    batch_id: BatchId,
    timeout: Annotated[
        float | None, typer.Option(help="give up after this many seconds (exit 124)")
    ] = None,
    as_json: AsJson = False,
) -> None:
    """A progress bar until the batch ends; the exit status says how it ended."""
    import farm.batches as batches

    b = batches.get(batch_id)
    deadline = None if timeout is None else time.monotonic() + timeout
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    progress = Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
        TimeRemainingColumn(), console=err, transient=True, disable=as_json,
    )  # fmt: skip
    with progress:
        bar = progress.add_task(b.name, total=b.total, completed=b.done)
        while not b.ended:
            if deadline is not None and time.monotonic() >= deadline:
                break
            time.sleep(0.5)
            b = batches.get(b.id)
            progress.update(bar, completed=b.done)
    if as_json:
        print(json.dumps(b.to_json(), indent=2))
    else:
        out.print(_describe(b), highlight=False)
    if not b.ended:
        err.print(f"still {b.status} after {timeout:g}s; the batch goes on", highlight=False)
        raise typer.Exit(EXIT_TIMEOUT)
    if b.status != "completed":
        raise typer.Exit(EXIT_NOT_COMPLETED)
    if b.failed:
        raise typer.Exit(EXIT_SOME_FAILED)


def _write_lines(batch_id: str, failed: bool, output: Path | None) -> None:
    import farm.batches as batches

    b = batches.get(batch_id)
    chunks = batches.results(b.id, failed=failed)
    n = 0
    if output is None:
        try:
            for n, text in enumerate(chunks, start=1):  # noqa: B007
                sys.stdout.write(text)
            sys.stdout.flush()
        except BrokenPipeError:  # `| head`: the reader has what it wanted
            import os

            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return
    else:
        tmp = output.with_name(output.name + ".part")
        try:
            with tmp.open("w", encoding="utf-8") as f:
                for n, text in enumerate(chunks, start=1):  # noqa: B007
                    f.write(text)
            tmp.replace(output)
        except OSError as e:
            from farm.errors import InvalidRequest

            raise InvalidRequest(f"cannot write {output}: {e.strerror}") from None
    kind = "error" if failed else "result"
    where = f" to {output}" if output else ""
    note = "" if b.ended else f" (the batch is {b.status}: more to come)"
    err.print(f"{n} {kind} lines{where}{note}", highlight=False)


Output = Annotated[
    Path | None, typer.Option("--output", "-o", help="write to this file [default: stdout]")
]


@batch_app.command("results")
@friendly
def results(batch_id: BatchId, output: Output = None) -> None:
    """The succeeded lines: OpenAI batch output lines, keyed by custom_id, in file order."""
    _write_lines(batch_id, False, output)


@batch_app.command("errors")
@friendly
def errors(batch_id: BatchId, output: Output = None) -> None:
    """The lines that failed, were cancelled or expired, with the reason."""
    _write_lines(batch_id, True, output)


@batch_app.command("cancel")
@friendly
def cancel(batch_id: BatchId, as_json: AsJson = False) -> None:
    """Cancel: lines not started never run; those that ended are kept."""
    import farm.batches as batches

    b = batches.cancel(batch_id)
    if as_json:
        print(json.dumps(b.to_json(), indent=2))
    elif b.ended:
        out.print(f"batch {b.id} already {b.status}: nothing to cancel", highlight=False)
    else:
        out.print(f"batch {b.id}: {b.status} (lines that ended are kept)", highlight=False)


@batch_app.command("feeder")
@friendly
def feeder() -> None:
    """Run the batch feeder here until Ctrl-C or SIGTERM (`farm up` and `farm serve` run
    one too)."""
    import signal
    import threading

    from farm.batches.feeder import Feeder

    stop = threading.Event()
    # A service manager's stop: the pass in progress ends and the lock is given back.
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    err.print("batch feeder running; Ctrl-C stops it", highlight=False)
    try:
        Feeder().run(stop)
    except KeyboardInterrupt:
        stop.set()
