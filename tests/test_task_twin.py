"""The Celery task on a real Celery worker and real Redis, with the engine's in-memory twin
behind `ModelCache(host_factory=...)`: no model, so the job's path (submit, stream, result,
usage row, cancel) is tested in seconds. The end-to-end tests on Gemma stay the proof that
the real engine does the same (test_e2e_infer.py)."""

from __future__ import annotations

import functools
from collections.abc import Iterator

import pytest
from celery.contrib.testing.worker import start_worker

import farm
from farm.context import FarmContext, get_context, reset_context
from farm.errors import JobCancelled
from farm.queue import queue_name
from farm.registry import queries, transaction, upgrade
from tests.conftest import finished_usage
from workers.heartbeat import Membership
from workers.host import EngineOptions
from workers.models import ModelCache
from workers.spec import ModelSpec
from workers.tasks import JobRunner, register_task
from workers.twin import TwinHost

TWIN = "twin"
WORKER = "twin-worker"
SECONDS_PER_TOKEN = 0.002


@pytest.fixture(scope="module")
def twin_farm(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[FarmContext]:
    """A registry with model 'twin', served by a real Celery worker (two slots) in this
    process whose model host is the twin; this process's client points at it."""
    home = tmp_path_factory.mktemp("twin-farm")
    db = f"sqlite:///{home / 'registry.db'}"
    upgrade(db)
    with transaction(db) as s:
        queries.add_model(s, name=TWIN, path=str(home / "no-model.gguf"), n_ctx=4096)
    env = {"FARM_HOME": str(home), "FARM_BROKER_URL": redis_url, "FARM_DATABASE_URL": db}
    with pytest.MonkeyPatch.context() as mp:
        for key, value in env.items():
            mp.setenv(key, value)
        reset_context()
        ctx = get_context()
        options = EngineOptions(slots=2, threads=1)
        cache = ModelCache(
            [ModelSpec(name=TWIN, path=str(home / "no-model.gguf"))],
            options=options,
            host_factory=functools.partial(TwinHost, seconds_per_token=SECONDS_PER_TOKEN),
        )
        membership = Membership(ctx, WORKER, "cpu")
        membership.options, membership.cache = options, cache
        membership.begin()
        cache.preload()
        register_task(ctx.app, JobRunner(ctx, WORKER, cache))
        try:
            with start_worker(
                ctx.app,
                pool="threads",
                concurrency=options.slots,
                perform_ping_check=False,
                queues=[queue_name(TWIN)],
                loglevel="WARNING",
            ):
                membership.join("cpu")  # leased: the client now accepts jobs for 'twin'
                yield ctx
        finally:
            membership.leave()
            cache.close()
            reset_context()


def usage_row(ctx: FarmContext, job_id: str) -> object:
    [row] = finished_usage(ctx.database_url, job_id)
    return row


def test_a_job_streams_its_text_returns_its_completion_and_writes_one_usage_row(twin_farm):
    job = farm.submit("Hello, twin! ", model=TWIN, max_tokens=100, session="alice")
    pieces = list(job.stream(timeout=30))
    assert "".join(pieces) == "Hello, twin! " and len(pieces) > 1  # streamed, piece by piece
    c = job.completion
    assert c is not None and c.text == "Hello, twin! " and c.finish_reason == "stop"
    assert (c.usage.prompt_tokens, c.usage.completion_tokens) == (14, 13)  # BOS + 13 bytes
    assert c.worker == WORKER and c.timings.ttft_ms is not None
    row = usage_row(twin_farm, job.id)
    assert (row.status, row.session, row.model, row.worker_id) == (  # type: ignore[attr-defined]
        "succeeded",
        "alice",
        TWIN,
        WORKER,
    )
    assert (row.prompt_tokens, row.completion_tokens) == (14, 13)  # type: ignore[attr-defined]


def test_max_tokens_and_stop_strings_end_a_job_as_on_the_real_engine(twin_farm):
    c = farm.infer("abcdef", model=TWIN, max_tokens=3)
    assert (c.text, c.finish_reason, c.usage.completion_tokens) == ("abc", "length", 3)
    c = farm.infer("one, two; three", model=TWIN, max_tokens=100, stop=[";"])
    assert (c.text, c.finish_reason) == ("one, two", "stop")
    chat = farm.infer(model=TWIN, messages=[{"role": "user", "content": "Hi"}], max_tokens=9)
    assert chat.text == "Hi"


def test_cancelling_a_running_job_stops_it_and_its_row_says_cancelled(twin_farm):
    long = "x" * 3000  # 6 s at the twin's pace: cancelled long before its end
    job = farm.submit(long, model=TWIN, max_tokens=3500)
    tokens = job.stream(timeout=30)
    assert next(tokens)  # it runs
    assert job.cancel() is True
    with pytest.raises(JobCancelled):
        for _ in tokens:
            pass
    row = usage_row(twin_farm, job.id)
    assert row.status == "cancelled"  # type: ignore[attr-defined]
    assert 0 < row.completion_tokens < 3000  # type: ignore[attr-defined]
    # The slot it held is free again: the next job runs to its end.
    assert farm.infer("after", model=TWIN, max_tokens=10).text == "after"
