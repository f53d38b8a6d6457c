"""`farm submit`, `farm result`, `farm cancel`: a job from the command line to its answer."""

from __future__ import annotations

import contextlib
import json
import re
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import typer

from farm.cli.base import Priority, app, err, friendly, get_settings, out
from farm.errors import FarmError


@app.command()
@friendly
def submit(
    prompt: Annotated[
        str, typer.Argument(metavar="PROMPT", help="the prompt ('-' reads it from stdin)")
    ],
    model: Annotated[
        str | None,
        typer.Option(
            "--model", "-m", metavar="NAME", help="model name (default: FARM_DEFAULT_MODEL)"
        ),
    ] = None,
    priority: Priority = "normal",
    session: Annotated[
        str, typer.Option(metavar="NAME", help="session the usage is billed to")
    ] = "default",
    chat: Annotated[bool, typer.Option("--chat", help="send the prompt as a chat message")] = False,
    system: Annotated[
        str | None, typer.Option(metavar="TEXT", help="system message (implies --chat)")
    ] = None,
    max_tokens: Annotated[
        int | None, typer.Option(metavar="N", help="most tokens to generate  [default: 256]")
    ] = None,
    max_time_ms: Annotated[
        int | None, typer.Option(metavar="MS", help="stop generating after this long")
    ] = None,
    stop: Annotated[
        list[str] | None, typer.Option(metavar="TEXT", help="stop string (repeatable)")
    ] = None,
    temperature: Annotated[
        float | None,
        typer.Option(
            metavar="X", help="0 to 5; 0 picks the likeliest  [default: the model's, else 0.8]"
        ),
    ] = None,
    top_p: Annotated[
        float | None,
        typer.Option(
            metavar="X",
            help="draw from the likeliest tokens up to this probability  [default: the model's, else 0.95]",
        ),
    ] = None,
    top_k: Annotated[
        int | None,
        typer.Option(
            metavar="N",
            help="draw from the N likeliest tokens (0: all)  [default: the model's, else 40]",
        ),
    ] = None,
    min_p: Annotated[
        float | None,
        typer.Option(
            metavar="X",
            help="drop tokens less likely than X times the likeliest  [default: the model's, else 0.05]",
        ),
    ] = None,
    typical_p: Annotated[
        float | None,
        typer.Option(
            metavar="X", help="locally typical sampling (1: off)  [default: the model's, else 1]"
        ),
    ] = None,
    repeat_penalty: Annotated[
        float | None,
        typer.Option(
            metavar="X",
            help="lower tokens seen in the last N (1: off)  [default: the model's, else 1]",
        ),
    ] = None,
    presence_penalty: Annotated[
        float | None,
        typer.Option(
            metavar="X",
            help="lower tokens already present (0: off)  [default: the model's, else 0]",
        ),
    ] = None,
    frequency_penalty: Annotated[
        float | None,
        typer.Option(
            metavar="X",
            help="lower tokens by how often they occur (0: off)  [default: the model's, else 0]",
        ),
    ] = None,
    penalty_last_n: Annotated[
        int | None,
        typer.Option(
            metavar="N", help="tokens the penalties look back over  [default: the model's, else 64]"
        ),
    ] = None,
    mirostat_mode: Annotated[
        int | None,
        typer.Option(
            metavar="N", help="Mirostat sampling: 0 off, 1 or 2  [default: the model's, else 0]"
        ),
    ] = None,
    mirostat_tau: Annotated[
        float | None,
        typer.Option(
            metavar="X", help="Mirostat's target surprise  [default: the model's, else 5]"
        ),
    ] = None,
    mirostat_eta: Annotated[
        float | None,
        typer.Option(
            metavar="X", help="Mirostat's learning rate  [default: the model's, else 0.1]"
        ),
    ] = None,
    seed: Annotated[
        int | None, typer.Option(metavar="N", help="the same seed repeats the same draws")
    ] = None,
    draft_max: Annotated[
        int | None,
        typer.Option(
            metavar="N",
            help="prompt-lookup speculation: most tokens drafted a step (0: none) "
            "[default: the worker's, 8]",
        ),
    ] = None,
    grammar: Annotated[
        Path | None,
        typer.Option(metavar="FILE", help="a GBNF grammar file the reply must follow"),
    ] = None,
    json_schema: Annotated[
        Path | None,
        typer.Option(metavar="FILE", help="a JSON schema file the reply must satisfy"),
    ] = None,
    no_wait: Annotated[bool, typer.Option("--no-wait", help="print the job id and return")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="print the Completion as JSON")] = False,
    wait_for_worker: Annotated[
        float,
        typer.Option(metavar="SECONDS", help="seconds to wait for a worker to serve the model"),
    ] = 0.0,
    timeout: Annotated[
        float | None, typer.Option(metavar="SECONDS", help="seconds to wait for the result")
    ] = None,
) -> None:
    """Queue a prompt; print its tokens as they are generated."""
    text = _read_stdin() if prompt == "-" else prompt
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
        "draft_max": draft_max,
        **_constraint(grammar, json_schema),
    }
    common = {
        "model": model or get_settings().default_model,
        "priority": priority,
        "session": session,
        **params,
    }
    if chat or system:
        common["messages"] = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": text}
        ]
    else:
        common["prompt"] = text
    with flag_names():
        # The request is checked (pydantic) before Celery, Redis and SQLAlchemy load: a bad
        # value is refused without waiting for them.
        from farm.request import make_request

        request = make_request({k: v for k, v in common.items() if v is not None})
        from farm.enqueue import submit_request

        job = submit_request(request, wait_for_worker=wait_for_worker)
    if no_wait:
        print(job.id)
        return
    signal.signal(signal.SIGTERM, _interrupt)  # killed while following: cancel, as Ctrl-C does
    follow(job, as_json=as_json, timeout=timeout)


# What `farm submit`'s errors call a request field: the flag the user typed. The
# sampling and stopping fields are each the flag of their name (--max-tokens, --top-p).
_FLAGS = {
    "model": "--model",
    "priority": "--priority",
    "session": "--session",
    "grammar": "--grammar",
    "response_format": "--json-schema",
    "prompt": "PROMPT",
}
_NESTED = re.compile(r"'(?:sampling|stopping)\.([a-z_]+)[\w.-]*'")
_TOP = re.compile(r"(invalid |give )'([a-z_]+)[\w.-]*'")


def as_flags(message: str) -> str:
    """A farm error about a request, with each field it names ('stopping.max_tokens',
    'sampling.top_p', 'model') written as `farm submit`'s flag (--max-tokens, --top-p,
    --model)."""
    message = _NESTED.sub(lambda m: "--" + m.group(1).replace("_", "-"), message)
    message = _TOP.sub(
        lambda m: m.group(1) + _FLAGS.get(m.group(2), m.group(0)[len(m.group(1)) :]), message
    )
    message = message.replace("'prompt' must not be empty", "PROMPT must not be empty")
    return message.replace("a JSON 'response_format'", "--json-schema")


@contextlib.contextmanager
def flag_names() -> Iterator[None]:
    """Re-raise the farm's errors about a request in the words of `farm submit`'s flags."""
    from farm.errors import InvalidRequest

    try:
        yield
    except InvalidRequest as e:
        raise InvalidRequest(as_flags(str(e))) from e


def _read_stdin() -> str:
    from farm.errors import InvalidRequest

    try:
        return sys.stdin.buffer.read().decode("utf-8")
    except UnicodeDecodeError as e:
        raise InvalidRequest(
            f"the prompt on stdin is not UTF-8 text (byte {e.start}); convert it, e.g. with iconv"
        ) from e


def _constraint(grammar: Path | None, json_schema: Path | None) -> dict[str, Any]:
    """--grammar / --json-schema as the request's `grammar` / `response_format`."""
    from farm.errors import InvalidRequest
    from farm.grammar import MAX_SCHEMA_DEPTH

    def read(path: Path, flag: str) -> str:
        try:
            return path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise InvalidRequest(f"{flag}: cannot read {path}: {e}") from e

    found: dict[str, Any] = {}
    if grammar is not None:
        found["grammar"] = read(grammar, "--grammar")
    if json_schema is not None:
        try:
            schema = json.loads(read(json_schema, "--json-schema"))
        except ValueError as e:
            raise InvalidRequest(f"--json-schema: {json_schema} is not JSON: {e}") from e
        except RecursionError:  # Python's JSON parser gives up near 1,000 levels
            raise InvalidRequest(
                f"--json-schema: {json_schema} nests too deep to read; "
                f"a schema takes at most {MAX_SCHEMA_DEPTH} levels"
            ) from None
        found["response_format"] = {
            "type": "json_schema",
            "json_schema": {"name": json_schema.stem[:64], "schema": schema},
        }
    return found


def _interrupt(*_: Any) -> None:
    raise KeyboardInterrupt


def follow(
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
        job.on_restart = lambda worker: err.print(
            f"\n[the worker running this job was lost; it starts over on {worker}]",
            highlight=False,
        )
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
    job_id: Annotated[str, typer.Argument(metavar="JOB_ID")],
    as_json: Annotated[bool, typer.Option("--json")] = False,
    timeout: Annotated[float | None, typer.Option(help="seconds to wait")] = None,
) -> None:
    """Wait for a job and print its text (or its Completion as JSON)."""
    import farm

    follow(farm.job(job_id), as_json=as_json, timeout=timeout, cancel_on_interrupt=False)


@app.command()
@friendly
def cancel(job_id: Annotated[str, typer.Argument(metavar="JOB_ID")]) -> None:
    """Cancel a job: a queued one never runs; a running one stops at its next token."""
    import farm

    if farm.job(job_id).cancel():
        out.print(f"cancelled {job_id}")
    else:
        out.print(f"job {job_id} had already ended; nothing to cancel")
