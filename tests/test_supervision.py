"""`farm up` and `farm fleet` supervise their workers: a crashed worker is reported with its
exit status and log, then restarted; a profile from the models file picks the models."""

import json
import os
import signal
import time

import pytest
import redis

from farm.config import Settings
from farm.embedded import EmbeddedFarm
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
        assert "worker   tiny exited with status -9; restarting now" in log
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


class _Proc:
    """A worker process: running while `returncode` is None, as Popen's poll() says."""

    pid = 4242

    def __init__(self, returncode: int | None = None):
        self.returncode = returncode

    def poll(self) -> int | None:
        return self.returncode


class _Supervised(EmbeddedFarm):
    """The supervisor's schedule alone: workers start, exit and get ready on the test's
    say-so, and nothing is spawned."""

    def __init__(self, tmp_path):
        self.said: list[str] = []
        super().__init__(Settings(home=tmp_path), ["tiny"], say=self.said.append)
        self.workers = {"tiny": _Proc()}
        self.starts = 0
        self.ready = False

    def _start_worker(self, model):
        self.starts += 1
        self.workers[model] = _Proc()

    def _ready(self, model, *, quiet=False):
        return self.ready

    def _requeue_jobs_of(self, model):
        return 0

    def log_tail(self, model, lines=10):
        return ""


def test_a_worker_that_was_ready_restarts_at_once_and_one_that_keeps_dying_backs_off(tmp_path):
    sup = _Supervised(tmp_path)
    backoff, restart_at, unready = {"tiny": 0.0}, {}, set()  # as watch() starts: all ready

    def watch_once():
        sup._watch_once(backoff, restart_at, unready, max_backoff=30.0)

    def dies(status=1):
        sup.workers["tiny"].returncode = status
        watch_once()

    def restart_is_due():
        restart_at["tiny"] = 0.0
        watch_once()

    dies(-9)  # a ready worker is killed: started again in the next round, with no wait
    assert sup.said[-1].startswith("worker   tiny exited with status -9; restarting now")
    watch_once()
    assert sup.starts == 1
    dies()  # and dies before it got ready: 1 s, then 2 s
    assert "restarting in 1s" in sup.said[-1] and restart_at["tiny"] > time.monotonic() + 0.5
    restart_is_due()
    dies()
    assert "restarting in 2s" in sup.said[-1]
    restart_is_due()
    sup.ready = True  # this start got ready: its next crash restarts at once again
    watch_once()
    dies(-9)
    assert "restarting now" in sup.said[-1] and restart_at["tiny"] <= time.monotonic()
    restart_is_due()
    sup.ready = False
    dies()
    assert "restarting in 1s" in sup.said[-1]
    restart_is_due()
    sup.ready = True  # got ready, and was killed before the supervisor looked again
    dies(-9)
    assert "restarting now" in sup.said[-1] and restart_at["tiny"] <= time.monotonic()
