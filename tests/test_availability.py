"""No job waits on a model nobody serves, and a job whose caller gave up is dropped."""

import subprocess
import sys
import threading
import time

import pytest

import farm
from farm.context import reset_context
from farm.registry import queries, transaction
from tests.conftest import MODEL, fill_slots, gemma_path

pytestmark = pytest.mark.e2e


@pytest.fixture
def orphan(farm_client):
    with transaction(farm_client.database_url) as s:
        if not any(m.name == "orphan" for m in queries.list_models(s)):
            queries.add_model(s, name="orphan", path=gemma_path(), n_ctx=512, chat_format="gemma")
    return "orphan"


def test_a_model_with_no_live_worker_is_refused_with_how_to_start_one(orphan):
    with pytest.raises(farm.NoLiveWorker, match="start one with `farm worker --model orphan`"):
        farm.submit("hi", model=orphan)
    started = time.monotonic()
    with pytest.raises(farm.NoLiveWorker):
        farm.submit("hi", model=orphan, wait_for_worker=1.0)
    assert 1.0 <= time.monotonic() - started < 5


def test_waiting_for_a_worker_succeeds_once_one_starts(farm_client, orphan):
    proc: list[subprocess.Popen[bytes]] = []

    def start_later() -> None:
        time.sleep(0.5)
        proc.append(
            subprocess.Popen(
                [sys.executable, "-m", "workers", "--model", orphan],
                env=farm_client.env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )

    threading.Thread(target=start_later).start()
    try:
        c = farm.infer("Hello", model=orphan, max_tokens=2, wait_for_worker=90, timeout=60)
        assert c.worker.startswith("orphan-")
    finally:
        for p in proc:
            p.terminate()
            p.wait(30)


def test_a_job_that_outwaits_its_expiry_is_dropped_unrun(farm_client, monkeypatch):
    blockers = fill_slots(max_tokens=100)  # every slot busy: the next job waits
    monkeypatch.setenv("FARM_JOB_EXPIRES", "1")
    reset_context()
    try:
        late = farm.submit("Too late", model=MODEL, max_tokens=2)
        with pytest.raises(farm.JobFailed, match="expired in its queue .* it was not run"):
            late.result(timeout=60)
        assert late.status() == "expired"
        for blocker in blockers:
            blocker.result(timeout=120)
    finally:
        monkeypatch.undo()
        farm_client.activate()
