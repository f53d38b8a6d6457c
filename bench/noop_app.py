"""A Celery app with farm's exact settings and one no-op task, for bench/celery_floor.py."""

import os

from farm.config import Settings
from farm.queue import make_app

app = make_app(Settings(), os.environ["FARM_BROKER_URL"])


@app.task(name="bench.noop")
def noop(x: int) -> int:
    return x
