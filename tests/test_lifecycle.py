"""Models on a running worker: load on demand within a memory budget, evict the least
recently used between jobs, keep pinned ones, unload idle ones, and load or unload on
command. The Gemma GGUF registered under several names stands in for several models
(241 MiB each: two fit in 600 MiB, three do not)."""

import json
import subprocess
import sys
import time

import pytest
import redis

import farm
from farm.registry import queries, transaction, upgrade
from tests.conftest import REDIS_URL, FarmUnderTest, gemma_path, run_worker

pytestmark = pytest.mark.e2e

LIFECYCLE_REDIS = REDIS_URL.rsplit("/", 1)[0] + "/13"
NAMES = ("gemma-a", "gemma-b", "gemma-c")


@pytest.fixture
def farm_of_three(redis_url, tmp_path):
    client = redis.Redis.from_url(LIFECYCLE_REDIS)
    client.flushdb()
    f = FarmUnderTest(tmp_path, LIFECYCLE_REDIS, f"sqlite:///{tmp_path / 'registry.db'}")
    upgrade(f.database_url)
    with transaction(f.database_url) as s:
        for name in NAMES:
            queries.add_model(s, name=name, path=gemma_path(), n_ctx=512, chat_format="gemma")
        junk = tmp_path / "junk.gguf"
        junk.write_text("not a model")
        queries.add_model(s, name="junk", path=str(junk))
    f.activate()
    yield f
    f.stop_workers()
    client.flushdb()


def start(f: FarmUnderTest, *args: str, name: str = "multi@test") -> None:
    log = (f.home / "worker.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "workers", "--name", name, *args],
        env=f.env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    f.workers.append(proc)
    f.wait_for_lease(args[1].split(",")[0], proc=proc)


def loaded(f: FarmUnderTest) -> set[str]:
    with transaction(f.database_url) as s:
        return {lease.model for lease in queries.live_leases(s) if lease.loaded}


def run(model: str) -> farm.Completion:
    return farm.infer("Hello", model=model, max_tokens=2, timeout=120)


def test_a_budget_too_small_for_a_model_is_refused_with_the_sizes(farm_of_three):
    out = run_worker(farm_of_three.env, "--models", "gemma-a", "--memory-budget", "100MiB")
    assert out.returncode == 2
    assert "model 'gemma-a' needs 241 MiB but the memory budget is 100 MiB" in out.stderr


def test_models_load_on_demand_and_the_least_recently_used_is_evicted(farm_of_three):
    f = farm_of_three
    start(f, "--models", ",".join(NAMES), "--memory-budget", "600MiB")
    assert loaded(f) == {"gemma-a", "gemma-b"}  # preloaded in order while they fit
    assert run("gemma-c").usage.completion_tokens > 0  # on demand: evicts a, used least
    assert loaded(f) == {"gemma-b", "gemma-c"}
    run("gemma-b")
    assert run("gemma-a").usage.completion_tokens > 0  # c is now the least recently used
    assert loaded(f) == {"gemma-a", "gemma-b"}
    status = farm_of_three.farm("status", "--json")
    models = {m["name"]: m for m in json.loads(status.stdout)["models"]}
    assert models["gemma-c"]["on_demand"] == ["multi@test"] and not models["gemma-c"]["workers"]


def test_a_pinned_model_is_never_evicted(farm_of_three):
    f = farm_of_three
    start(f, "--models", "gemma-a,gemma-b", "--memory-budget", "300MiB", "--pin", "gemma-a")
    assert loaded(f) == {"gemma-a"}
    with pytest.raises(farm.JobFailed, match="pinned models .gemma-a. leave too little"):
        run("gemma-b")
    assert loaded(f) == {"gemma-a"} and run("gemma-a").usage.completion_tokens > 0


def test_load_and_unload_on_a_live_worker_and_idle_unload(farm_of_three):
    f = farm_of_three
    start(f, "--models", "gemma-a", "--keep-alive", "6")
    r = f.farm("models", "load", "gemma-b", "--worker", "multi@test")
    assert r.returncode == 0, r.stderr
    assert "loaded gemma-b" in r.stdout and "gemma-b" in loaded(f)
    assert run("gemma-b").usage.completion_tokens > 0  # it now serves b's queue too
    r = f.farm("models", "unload", "gemma-b", "--worker", "multi@test")
    assert r.returncode == 0, r.stderr
    assert "gemma-b" not in loaded(f)
    again = f.farm("models", "unload", "gemma-b", "--worker", "multi@test")
    assert again.returncode == 1 and "'gemma-b' is not loaded on this worker" in again.stderr

    broken = f.farm("models", "load", "junk", "--worker", "multi@test")
    assert broken.returncode == 1 and "is not a GGUF file" in broken.stderr
    time.sleep(2.5)  # two heartbeats: a failed load must leave no lease behind
    with transaction(f.database_url) as s:
        assert "junk" not in {lease.model for lease in queries.live_leases(s)}

    bad = f.farm("models", "load", "gemma-a", "--worker", "nobody@nowhere")
    assert bad.returncode == 1 and "no live worker 'nobody@nowhere'" in bad.stderr
    bad = f.farm("models", "load", "nope", "--worker", "multi@test")
    assert bad.returncode == 1 and "unknown model 'nope'" in bad.stderr

    deadline = time.monotonic() + 25  # keep-alive 6 s, checked on each 1 s heartbeat
    while loaded(f) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert loaded(f) == set()
    assert run("gemma-b").usage.completion_tokens > 0  # loads again on demand


def test_two_workers_cannot_claim_the_same_device(farm_of_three):
    f = farm_of_three
    start(f, "--models", "gemma-a", "--device", "0", name="first@test")
    out = run_worker(f.env, "--models", "gemma-b", "--device", "0")
    assert out.returncode == 2
    assert "device gpu0" in out.stderr and "already used by worker first@test" in out.stderr


def test_a_worker_restarted_under_its_name_requeues_the_job_it_died_with(farm_of_three):
    f = farm_of_three
    start(f, "--models", "gemma-a", name="solo@test")
    job = farm.submit("Tell me a long story.", model="gemma-a", max_tokens=150)
    next(job.stream(timeout=60))  # running
    victim = f.workers.pop()
    victim.kill()
    victim.wait()
    restarted_at = time.monotonic()
    start(f, "--models", "gemma-a", name="solo@test")  # as systemd would, at once
    c = job.result(timeout=120)
    assert job.restarts == 1
    # The lease of the dead process never expires on its own (the new one renews it), so
    # only the restart's requeue can bring the job back before the visibility timeout.
    assert c.worker == "solo@test" and time.monotonic() - restarted_at < 60
    dup = run_worker(f.env, "--models", "gemma-b", "--name", "solo@test")
    assert dup.returncode == 2 and "a worker named solo@test is already running here" in dup.stderr
