"""`farm worker --simulate N`: the real worker (Celery, leases, heartbeats, usage rows,
streams, cancel) over the engine's in-memory twin, for fleet simulations without a model."""

from __future__ import annotations

import time

import pytest

import farm
from farm.registry import queries, transaction
from tests.conftest import FarmUnderTest, finished_usage, gemma_path

pytestmark = pytest.mark.e2e


def test_a_simulated_worker_serves_jobs_as_a_real_one_at_its_pace(live_farm: FarmUnderTest):
    with transaction(live_farm.database_url) as s:
        if not any(m.name == "sim" for m in queries.list_models(s)):
            queries.add_model(s, name="sim", path=gemma_path(), n_ctx=2048)
    proc = live_farm.start_worker("sim", "sim-worker", "--simulate", "200", "--parallel", "4")
    try:
        live_farm.wait_for_lease("sim", proc=proc, timeout=60)
        started = time.monotonic()
        reply = farm.infer("hello, fleet", model="sim", max_tokens=100, session="sim-test")
        took = time.monotonic() - started
        assert reply.text == "hello, fleet"  # the twin echoes its prompt, a token per byte
        assert reply.usage.completion_tokens == len("hello, fleet") and took >= 12 / 200
        [row] = finished_usage(live_farm.database_url, reply.job_id)
        assert row.status == "succeeded" and row.worker_id == "sim-worker"  # type: ignore[attr-defined]

        job = farm.submit("x" * 2000, model="sim", max_tokens=2000)  # 10 s at 200 tokens/s
        pieces = job.stream()
        next(pieces)
        assert job.cancel()
        [row] = finished_usage(live_farm.database_url, job.id, timeout=10)
        assert row.status == "cancelled" and row.completion_tokens < 2000  # type: ignore[attr-defined]
    finally:
        proc.terminate()
        proc.wait(30)
        live_farm.workers.remove(proc)
