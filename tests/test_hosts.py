"""Hosts that fail: a worker on each of two hosts, one Redis and one PostgreSQL.

Each host is a network namespace joined to this one by a veth pair (tests/netns.py); its
worker reaches the servers here (which listen on 127.0.0.1 only) through proxies on its
veth's address, as a GPU host reaches the farm's servers over the network. Jobs spread over
both hosts; then the busier host's worker is killed with kill -9, or its link is cut for
40 s mid-job. Either way its jobs run again on the other host and each ends once: one `done`
event, one result, one usage row counted once; a host that comes back writes nothing more
on the jobs taken from it, and serves again. The workers run the engine's twin
(`--simulate`): what is tested is the worker above the engine, and the network.

Needs root and `ip`: skipped with the reason elsewhere, and failed under CI=true (CI runs
as root). `pytest tests/test_hosts.py -s` prints the recovery times; bench/hosts.py runs it
five times for their median and max.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import pytest
import redis
from sqlalchemy import select
from sqlalchemy.engine import make_url

import farm
from farm.context import get_context
from farm.queue import stream_key
from farm.registry import queries, transaction, upgrade
from farm.registry.tables import UsageRecord
from farm.stream import RECONNECT_WINDOW_S
from tests import netns
from tests.conftest import (
    IN_CI,
    REDIS_URL,
    FarmUnderTest,
    drop_pg_database,
    finished_usage,
    gemma_path,
    holds_lease,
    make_pg_database,
)
from tests.proxy import Proxy

pytestmark = [pytest.mark.e2e, pytest.mark.postgres]

HOSTS_REDIS = REDIS_URL.rsplit("/", 1)[0] + "/6"  # its own database: no other test uses 6
SIM = "sim-hosts"  # a model served on the twin; the file is only stat()ed
PACE = 50  # tokens a second per sequence
SLOTS = 4  # per worker: JOBS is more than one worker holds, so both hosts run some
JOBS = SLOTS + 1
LONG = 400  # tokens (the twin echoes its prompt, a token a byte): 8 s at PACE
# Longer than the window a worker rides out a lost Redis (RECONNECT_WINDOW_S, 30 s): the
# cut-off runs give up on Redis during the cut, and what they do then must write nothing
# when the link is back. (At 30 s exactly, whether they give up is a race.)
CUT_S = RECONNECT_WINDOW_S + 10
# A lost host's job runs again within its lease (FARM_LEASE_TTL, 4 s here), the next
# heartbeat of the other host (1 s) and the dead run's key (the lease's ttl, running
# alongside): about 5 s. Three times that means it waited on something else (Redis's
# visibility timeout, a reaper that did not run).
RECOVERY_S = 15


@dataclass
class HostUnderTest:
    """One host: its namespace, its proxies to the servers here, its worker."""

    worker_id: str
    net: netns.Host
    farm: FarmUnderTest
    proxies: list[Proxy]
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        args = ("--simulate", str(PACE), "--parallel", str(SLOTS))
        self.proc = self.farm.start_worker(SIM, self.worker_id, *args)

    def log(self) -> str:
        return "".join(p.read_text(errors="replace") for p in sorted(self.farm.home.glob("*.log")))


@dataclass
class Fleet:
    hosts: list[HostUnderTest]
    db: str  # the registry, reached directly from here
    r: redis.Redis = field(init=False)

    def __post_init__(self) -> None:
        self.r = get_context().redis

    def serving(self) -> None:
        """Each host has a live worker holding its lease (one killed before is restarted)."""
        for host in self.hosts:
            if host.proc is None or host.proc.poll() is not None:
                host.start()
        for host in self.hosts:
            holds_lease(host.worker_id, self.db, host.proc, SIM)


def reached_through_proxies(net: netns.Host, db: str, broker: str) -> tuple[list[Proxy], str, str]:
    """Proxies on the host's veth address to the registry and Redis here, and their URLs."""
    db_url, broker_url = make_url(db), urlsplit(broker)
    pg = Proxy(db_url.host or "127.0.0.1", db_url.port or 5432, listen=net.address)
    rd = Proxy(broker_url.hostname or "127.0.0.1", broker_url.port or 6379, listen=net.address)
    return (
        [pg, rd],
        db_url.set(host=net.address, port=pg.port).render_as_string(hide_password=False),
        broker_url._replace(netloc=f"{net.address}:{rd.port}").geturl(),
    )


@pytest.fixture(scope="module")
def fleet(
    redis_url: str, pg_server: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Fleet]:
    nets: list[netns.Host] = []
    for _ in range(2):
        net = netns.make()
        if isinstance(net, str):
            for made in nets:
                made.close()
            if IN_CI:
                pytest.fail(f"network namespaces are required when CI=true: {net}")
            pytest.skip(net)
        nets.append(net)
    client = redis.Redis.from_url(HOSTS_REDIS)
    client.flushdb()
    db = make_pg_database(pg_server)
    hosts: list[HostUnderTest] = []
    try:
        upgrade(db)
        with transaction(db) as s:
            queries.add_model(s, name=SIM, path=gemma_path(), n_ctx=2048)
        home = tmp_path_factory.mktemp("hosts")
        for name, net in zip("ab", nets, strict=True):
            proxies, db_there, broker_there = reached_through_proxies(net, db, HOSTS_REDIS)
            f = FarmUnderTest(home / name, broker_there, db_there)
            f.home.mkdir()
            f.prefix = net.prefix
            hosts.append(HostUnderTest(f"{name}@hosts", net, f, proxies))
        here = FarmUnderTest(home / "client", HOSTS_REDIS, db)  # the test's own client
        here.activate()
        f = Fleet(hosts, db)
        f.serving()
        yield f
    finally:
        for host in hosts:
            host.farm.stop_workers()
            for proxy in host.proxies:
                proxy.cut()
        for net in nets:
            net.close()
        client.flushdb()
        drop_pg_database(pg_server, db)


# -- what the tests wait for and check ----------------------------------------------------
def spread(fleet: Fleet, tokens: int) -> tuple[list[farm.Job], dict[str, list[str]]]:
    """Submit JOBS jobs of `tokens` tokens each; once every one runs (its row says where,
    and it has streamed), return them and the jobs each worker runs. Both hosts run some:
    neither takes more than its SLOTS."""
    jobs = [
        farm.submit(f"{i:03d}" + "x" * (tokens - 3), model=SIM, max_tokens=tokens)
        for i in range(JOBS)
    ]
    ids = {job.id for job in jobs}
    deadline = time.monotonic() + 30
    while True:
        with transaction(fleet.db) as s:
            running = queries.running_jobs(s)
        where = {w: [j for j in js if j in ids] for w, js in running.items()}
        placed = sum(len(js) for js in where.values())
        streamed = all(fleet.r.xlen(stream_key(job.id)) for job in jobs)
        if placed == JOBS and streamed:
            break
        assert time.monotonic() < deadline, f"not all {JOBS} jobs running after 30 s: {where}"
        time.sleep(0.05)
    on = {host.worker_id: where.get(host.worker_id, []) for host in fleet.hosts}
    assert all(on.values()), f"the jobs did not spread over both hosts: {on}"
    return jobs, on


def busier(fleet: Fleet, on: dict[str, list[str]]) -> tuple[HostUnderTest, HostUnderTest]:
    """The host running more of the jobs, and the other (which has a slot free for them)."""
    a, b = sorted(fleet.hosts, key=lambda h: len(on[h.worker_id]), reverse=True)
    return a, b


def running_again(fleet: Fleet, job_ids: list[str], worker: str, since: float) -> float:
    """Seconds from `since` until one of the jobs starts over on `worker` (its stream's
    `restart` event): the job running again."""
    deadline = since + 60
    while True:
        for job_id in job_ids:
            events = fleet.r.xrange(stream_key(job_id))
            if any(f["kind"] == "restart" and f.get("worker") == worker for _, f in events):
                return time.monotonic() - since
        assert time.monotonic() < deadline, f"none of {job_ids} ran again on {worker} in 60 s"
        time.sleep(0.05)


def ended_once(fleet: Fleet, job: farm.Job, worker: str, timeout: float) -> None:
    """The job succeeded on `worker`, once: its stream has one `done`, and after its last
    `restart` only that run's text; the result backend holds that run's result; its usage
    row is that run's, with that run's tokens."""
    c = job.result(timeout=max(1.0, timeout))
    assert c.worker == worker
    events = [f for _, f in fleet.r.xrange(stream_key(job.id))]
    kinds = [f["kind"] for f in events]
    assert kinds.count("done") == 1 and kinds[-1] == "done", kinds
    restarts = [n for n, k in enumerate(kinds) if k == "restart"]
    after = events[restarts[-1] + 1 :] if restarts else events
    assert "".join(f["text"] for f in after if f["kind"] == "token") == c.text
    stored = get_context().app.AsyncResult(job.id)
    deadline = time.monotonic() + 10  # Celery stores the result after the `done` event
    while stored.state == "PENDING" and time.monotonic() < deadline:
        time.sleep(0.05)
    assert stored.state == "SUCCESS" and stored.result["worker"] == worker
    [row] = finished_usage(fleet.db, job.id, timeout=30)
    assert (row.status, row.worker_id) == ("succeeded", worker)  # type: ignore[attr-defined]
    assert row.completion_tokens == c.usage.completion_tokens == len(c.text)  # type: ignore[attr-defined]


def requeued_by(reaper: HostUnderTest, lost: HostUnderTest, job_ids: list[str]) -> None:
    """`reaper`'s heartbeat found `lost`'s leases expired and put its jobs back in the queue
    at once (not after Redis's visibility timeout)."""
    log = reaper.log()
    for job_id in job_ids:
        assert f"worker {lost.worker_id} is lost; its job {job_id} is queued again" in log


def written(fleet: Fleet, job_ids: list[str]) -> dict[str, Any]:
    """All the jobs' stream events, stored results and usage rows: what workers wrote."""
    with transaction(fleet.db) as s:
        rows = s.scalars(select(UsageRecord).where(UsageRecord.job_id.in_(job_ids)))
        found: dict[str, Any] = {
            r.job_id: (r.status, r.worker_id, r.completion_tokens, r.finished_at) for r in rows
        }
    for job_id in job_ids:
        found[f"stream {job_id}"] = fleet.r.xrange(stream_key(job_id))
        found[f"result {job_id}"] = get_context().app.AsyncResult(job_id).result
    return found


def idle(host: HostUnderTest, timeout: float = 60) -> None:
    """Wait until `host`'s worker answers (its consumer is back on the broker) and runs
    nothing: every run it had when it was cut off has ended."""
    inspect = get_context().app.control.inspect(destination=[host.worker_id], timeout=1)
    deadline = time.monotonic() + timeout
    while True:
        active = (inspect.active() or {}).get(host.worker_id)
        if active == []:
            return
        assert time.monotonic() < deadline, f"{host.worker_id} still runs {active} after {timeout}s"
        time.sleep(0.5)


# -- the tests ---------------------------------------------------------------------------------
def test_the_hosts_namespaces_reach_the_servers_only_through_their_links(fleet):
    """The scenario's premise: a host's worker has no other way to the servers here than its
    veth (127.0.0.1 in its namespace is its own), so that cutting the link cuts it off."""
    host = fleet.hosts[0]
    port = urlsplit(HOSTS_REDIS).port or 6379
    probe = f"import socket; socket.create_connection(('127.0.0.1', {port}), timeout=2)"
    r = subprocess.run([*host.net.prefix, "python3", "-c", probe], capture_output=True, text=True)
    assert r.returncode != 0 and "refused" in r.stderr.lower(), r.stderr


def test_a_host_killed_with_kill_9_has_its_jobs_finish_on_the_other_counted_once(fleet):
    fleet.serving()
    jobs, on = spread(fleet, LONG)
    killed, other = busier(fleet, on)
    assert killed.proc is not None
    os.kill(killed.proc.pid, signal.SIGKILL)  # no supervisor here: nobody restarts it
    killed_at = time.monotonic()
    assert killed.proc.wait(10) == -signal.SIGKILL
    took = running_again(fleet, on[killed.worker_id], other.worker_id, killed_at)
    print(
        f"\nkill -9 of {killed.worker_id} ({len(on[killed.worker_id])} jobs) -> one running "
        f"again on {other.worker_id}: {took:.1f} s"
    )
    assert took < RECOVERY_S
    for job in jobs:
        ended_once(fleet, job, other.worker_id, timeout=60)
    requeued_by(other, killed, on[killed.worker_id])


def test_a_host_cut_off_mid_job_has_its_jobs_run_elsewhere_and_writes_nothing_more_when_back(
    fleet,
):
    fleet.serving()
    jobs, on = spread(fleet, LONG)
    cut, other = busier(fleet, on)
    moved = on[cut.worker_id]
    cut.net.cut()
    cut_at = time.monotonic()
    try:
        took = running_again(fleet, moved, other.worker_id, cut_at)
        print(
            f"\nlink of {cut.worker_id} cut ({len(moved)} jobs) -> one requeued and running "
            f"on {other.worker_id}: {took:.1f} s"
        )
        assert took < RECOVERY_S
        for job in jobs:  # every one on the other host, before the link is back
            ended_once(fleet, job, other.worker_id, timeout=cut_at + CUT_S - 1 - time.monotonic())
        before = written(fleet, [job.id for job in jobs])
        requeued_by(other, cut, moved)
        assert cut.proc is not None and cut.proc.poll() is None  # alive, only unreachable
        time.sleep(max(0.0, cut_at + CUT_S - time.monotonic()))  # the outage's length
    finally:
        cut.net.restore()
    back_at = time.monotonic()
    holds_lease(cut.worker_id, fleet.db, cut.proc, SIM)  # it leases again
    idle(cut)  # and its cut-off runs have ended
    print(
        f"link back -> {cut.worker_id} serving, its cut-off runs ended: {time.monotonic() - back_at:.1f} s"
    )
    assert written(fleet, [job.id for job in jobs]) == before
    log = cut.log()
    for job_id in moved:
        assert f"job {job_id} was taken over by another run; this run stops" in log

    again, on_again = spread(fleet, 100)  # both hosts run some: the cut-off one serves
    for job in again:
        worker = next(w for w, ids in on_again.items() if job.id in ids)
        ended_once(fleet, job, worker, timeout=30)
