"""The `farm` command line: submit and follow jobs, run workers and the embedded farm,
manage models, read usage.

Every error a user can cause is printed as one line saying what was wrong and what to do,
with exit status 1; nothing is half-queued. A mistyped option or value is refused (exit 2)
while the arguments are parsed.

Each command imports the farm's libraries (Celery, Redis, SQLAlchemy, pydantic-settings)
inside its body, for the CLI's start time: they take seconds to load on a small machine, and
`--help` or an argument error must not wait for them.
"""

from farm.cli import batch, embed, fleet, gateway, jobs, models, ops, quota  # noqa: F401  (each registers its commands)
from farm.cli.base import app


def main() -> None:
    app()


__all__ = ["app", "main"]
