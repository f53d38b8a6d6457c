"""`farm up` and `farm fleet` supervise their workers: a crashed worker is reported with its
exit status and log, then restarted; a profile from the models file picks the models."""

import json
import os
import signal
import time

import pytest
import redis

from farm.registry import queries, transaction
from tests.conftest import REDIS_URL, gemma_path, run_cli, start_farm

pytestmark = pytest.mark.e2e

SUPERVISION_REDIS = REDIS_URL.rsplit("/", 1)[0] + "/12"


@pytest.fixture
def env(redis_url, tmp_path):
    client = redis.Redis.from_url(SUPERVISION_REDIS)
    client.flushdb()
    (tmp_path / "models.toml").write_text(
        f'[models.tiny]\npath = "{gemma_path()}"\nn_ctx = 512\nchat_format = "gemma"\n\n'
        '[profiles.fast]\nmodels = ["tiny"]\n'
    )
    yield {
        **{k: v for k, v in os.environ.items() if not k.startswith("FARM_")},
        "FARM_HOME": str(tmp_path),
        "FARM_BROKER_URL": SUPERVISION_REDIS,
        "FARM_DATABASE_URL": f"sqlite:///{tmp_path / 'registry.db'}",
        "FARM_HEARTBEAT_INTERVAL": "1",
        "FARM_LEASE_TTL": "4",
        "PYTHONUNBUFFERED": "1",
    }
    client.flushdb()


def lease_pids(env, model="tiny"):
    with transaction(env["FARM_DATABASE_URL"]) as s:
        ids = {lease.worker_id for lease in queries.live_leases(s, model)}
        return {w.pid for w in queries.list_workers(s) if w.id in ids}


def wait_for(predicate, timeout=60):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.2)


def test_fleet_serves_a_profile_and_restarts_a_crashed_worker(env):
    proc = start_farm(env, "fleet", "--profile", "fast")
    try:
        assert proc.stderr is not None
        [first] = lease_pids(env)
        os.kill(first, signal.SIGKILL)
        lines = []
        for line in proc.stderr:
            lines.append(line)
            if "restarted" in line:
                break
        log = "".join(lines)
        assert "worker   tiny exited with status -9; restarting in 1s" in log
        assert "Last lines of" in log
        wait_for(lambda: lease_pids(env) - {first})
        # On a worker host `farm status` asks `farm fleet` (farm.local), loading no SQLAlchemy.
        r = run_cli({**env, "PYTHONPROFILEIMPORTTIME": "1"}, "status", "--json")
        assert r.returncode == 0, r.stderr
        assert "sqlalchemy" not in r.stderr and "import time:" in r.stderr
        assert [m["name"] for m in json.loads(r.stdout)["models"]] == ["tiny"]
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(60)
    assert proc.returncode == 0
    assert lease_pids(env) == set()


def test_fleet_needs_a_broker_and_profiles_must_exist(env):
    bare = {k: v for k, v in env.items() if k != "FARM_BROKER_URL"}
    r = run_cli(bare, "fleet", "--model", "tiny", timeout=60)
    assert r.returncode == 1 and "farm fleet joins an existing farm" in r.stderr
    r = run_cli(env, "up", "--profile", "slow", timeout=60)
    assert (
        r.returncode == 1 and "no profile 'slow'" in r.stderr and "profiles there: fast" in r.stderr
    )
