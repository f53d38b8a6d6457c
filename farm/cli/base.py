"""What every `farm` subcommand shares: the Typer apps, the consoles, and `friendly`,
which turns farm's errors into one clear line and exit status 1."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable
from functools import wraps
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console

from farm.cli.version import version_callback
from farm.errors import FarmError
from farm.queue import PRIORITIES  # standard library only: --priority is checked as it is parsed

app = typer.Typer(
    help="farm: an inference farm for llama.cpp models.",
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)
models_app = typer.Typer(
    help="Register, list and remove models (`farm models` alone lists them).",
    invoke_without_command=True,
)
db_app = typer.Typer(help="The registry's schema.", no_args_is_help=True)


@app.callback()
def _root(
    version: bool = typer.Option(
        False,
        "--version",
        is_eager=True,
        help="farm's, Celery's and llama-cpp-python's versions, and whether llama.cpp has GPU offload",
        callback=version_callback,
    ),
) -> None:
    """farm: an inference farm for llama.cpp models."""


app.add_typer(models_app, name="models")
app.add_typer(db_app, name="db")


class _Output(Console):
    """stdout. A reader that leaves early (`farm status | head -1`) has what it wanted:
    rich then stops writing (stdout goes to /dev/null) and the command ends with status 0,
    not rich's 1, as when the whole output fit in the pipe."""

    def on_broken_pipe(self) -> None:
        try:
            super().on_broken_pipe()
        except SystemExit:
            raise SystemExit(0) from None


# soft_wrap: piped output keeps ids and paths whole instead of folding at 80 columns.
out = _Output(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)
F = TypeVar("F", bound=Callable[..., Any])


def choice(names: Iterable[str], what: str) -> Callable[[str], str]:
    """A parser that refuses any value but `names` while the arguments are parsed (exit 2,
    naming the option), before a command loads the farm's libraries."""
    known = tuple(names)

    def parse(value: str) -> str:
        if value not in known:
            raise typer.BadParameter(f"'{value}' is not {what}; use one of: {', '.join(known)}")
        return value

    return parse


priority_level = choice(PRIORITIES, "a priority")
# The job states of the registry's usage rows (farm.registry.tables.JOB_STATUSES, which
# loads SQLAlchemy): named here so that `farm jobs --status` is checked as it is parsed.
JOB_STATUSES = ("queued", "running", "succeeded", "failed", "cancelled", "expired")
Priority = Annotated[
    str,
    typer.Option(
        "--priority", "-p", metavar="LEVEL", parser=priority_level, help="high, normal or low"
    ),
]


def friendly(fn: F) -> F:
    """Turn farm's errors into one clear line and exit status 1; a reader that leaves the
    pipe early (`| head`) ends the command quietly, with status 0."""

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            result = fn(*args, **kwargs)
            sys.stdout.flush()  # a closed pipe fails here, not at the interpreter's exit
            return result
        except FarmError as e:
            message = str(e)
        except BrokenPipeError:  # `farm status | head -1`: the reader has what it wanted
            import os

            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nothing to flush to
            raise typer.Exit(0) from None
        except Exception as e:
            if not _unreachable(e):
                raise
            message = f"cannot reach the farm's Redis: {e}; is `farm up` running, or FARM_BROKER_URL right?"
        err.print(f"[bold red]error:[/] {message}", markup=True, highlight=False, soft_wrap=True)
        raise typer.Exit(1)

    return wrapper  # type: ignore[return-value]


def fold_table(*headers: str, title: str | None = None, whole: tuple[str, ...] = ()) -> Any:
    """A compact table that never cuts a cell; the `whole` columns (ids and names to copy)
    stay on one line as far as the terminal's width allows (farm.cli.tables)."""
    from farm.cli.tables import FoldTable

    return FoldTable(*headers, title=title, whole=whole)


def _unreachable(e: Exception) -> bool:
    """A lost connection to Redis (imported only now: the CLI starts without them). Not a
    reader that left (`farm result ID | head`: a BrokenPipeError, a ConnectionError too),
    which `friendly` ends quietly."""
    if isinstance(e, BrokenPipeError):
        return False
    import redis
    from kombu.exceptions import OperationalError as KombuOperationalError

    return isinstance(e, redis.RedisError | KombuOperationalError | ConnectionError)


def get_settings() -> Any:
    from farm.config import get_settings as settings

    return settings()


def _db_url_for_writes() -> str:
    """The registry to register models in, created and migrated if this is a fresh home."""
    from farm.registry import upgrade

    settings = get_settings()
    try:
        return settings.existing_database_url()
    except FarmError:
        url = settings.resolved_database_url()
        upgrade(url)
        return url


def _db_url() -> str:
    return get_settings().existing_database_url()
