"""A Celery app with farm's exact settings and one no-op task, for bench/celery_floor.py."""

import os

from farm.broker import make_app
from farm.config import Settings

app = make_app(Settings(), os.environ["FARM_BROKER_URL"])


@app.task(name="bench.noop")
def noop(x: int) -> int:
    return x
