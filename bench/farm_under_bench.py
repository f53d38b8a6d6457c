"""What the benchmarks share: the farm they measure, and a free port.

The farm named by FARM_BROKER_URL / FARM_DATABASE_URL when they are set; else a whole
embedded farm (valkey broker, SQLite registry, one worker per model) in a temporary
folder, stopped on exit. Benchmarks run as `python bench/NAME.py`, which puts this folder
on the import path.
"""

from __future__ import annotations

import os
import socket
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def farm_for_bench(
    models: list[str], home: Path | None = None, *, parallel: int | None = None
) -> Iterator[None]:
    from farm.config import get_settings
    from farm.context import reset_context
    from farm.embedded import EmbeddedFarm

    if os.environ.get("FARM_BROKER_URL"):
        yield
        return
    os.environ["FARM_HOME"] = str(home or tempfile.mkdtemp(prefix="farm-bench-"))
    reset_context()
    embedded = EmbeddedFarm(get_settings(), models, say=lambda m: print(m, file=sys.stderr))
    if parallel is not None:
        embedded.parallel = dict.fromkeys(models, parallel)
    embedded.start()
    os.environ["FARM_BROKER_URL"] = embedded.broker_url
    reset_context()
    try:
        yield
    finally:
        embedded.stop()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
