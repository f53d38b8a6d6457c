"""The `farm` command line: submit and follow jobs, run workers and the embedded farm,
manage models, read usage.

Every error a user can cause is printed as one line saying what was wrong and what to do,
with exit status 1; nothing is half-queued.
"""

from farm.cli import batch, fleet, gateway, jobs, models, ops, quota  # noqa: F401  (each registers its commands)
from farm.cli.base import app


def main() -> None:
    app()


__all__ = ["app", "main"]
