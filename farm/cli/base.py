"""What every `farm` subcommand shares: the Typer apps, the consoles, and `friendly`,
which turns farm's errors into one clear line and exit status 1."""

from __future__ import annotations

from collections.abc import Callable
from functools import wraps
from typing import Any, TypeVar

import typer
from rich.console import Console

from farm.cli.version import version_callback
from farm.errors import FarmError

app = typer.Typer(
    help="farm: an inference farm for llama.cpp models.",
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)
models_app = typer.Typer(help="Register, list and remove models.", no_args_is_help=True)
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
    reader that left (`farm result ID | head`): click ends those quietly."""
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
