"""Real Redis Sentinel for tests: a master, a replica and a sentinel, each a `redis-server`
process on a free port, with their files in a folder the test gives.

The replica follows the master through a `Proxy` (tests/proxy.py), so that a test can stop
replication (`partition()`) and lose the master's last writes for real when it kills the
master, as asynchronous replication does when a master dies under load.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import subprocess
import time
from pathlib import Path

import redis

from tests.conftest import _missing, free_port
from tests.proxy import Proxy

MASTER_NAME = "farmtest"


def redis_server() -> str:
    """The `redis-server` binary; skips the test (fails it under CI=true) without one."""
    found = shutil.which("redis-server")
    if not found:
        _missing("redis-server (apt-get install redis-server)", "not on PATH")
    return str(found)


def wait_until(what: str, ok: object, timeout: float = 20.0, every: float = 0.02) -> float:
    """Poll `ok()` until it is true; returns the time.monotonic() it was first seen true."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if ok():  # type: ignore[operator]
                return time.monotonic()
        except redis.RedisError:
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout}s")
        time.sleep(every)


class SentinelSet:
    """A master, one replica (through a proxy) and one sentinel watching them."""

    def __init__(self, folder: Path, *, replica: bool = True, down_after_ms: int = 1000):
        self.folder = folder
        self.binary = redis_server()
        self.down_after_ms = down_after_ms
        self.master_port = free_port()
        self.replica_port = free_port() if replica else None
        self.sentinel_port = free_port()
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.proxy: Proxy | None = None
        self._clients: list[redis.Redis] = []  # closed by stop()

    # -- starting and stopping ----------------------------------------------------------------
    def start(self) -> SentinelSet:
        self._server("master", self.master_port)
        if self.replica_port is not None:
            self.proxy = Proxy("127.0.0.1", self.master_port)
            self._server(
                "replica", self.replica_port, "--replicaof", "127.0.0.1", str(self.proxy.port)
            )
            replica = self.client(self.replica_port)
            wait_until(
                "the replica in sync",
                lambda: replica.info("replication").get("master_link_status") == "up",
            )
        conf = self.folder / "sentinel.conf"
        conf.write_text(
            f"port {self.sentinel_port}\nbind 127.0.0.1\ndir {self.folder}\n"
            f"sentinel monitor {MASTER_NAME} 127.0.0.1 {self.master_port} 1\n"
            f"sentinel down-after-milliseconds {MASTER_NAME} {self.down_after_ms}\n"
            f"sentinel failover-timeout {MASTER_NAME} 10000\n"
        )
        self.procs["sentinel"] = self._spawn("sentinel", [str(conf), "--sentinel"])
        sentinel = self.sentinel_client()
        wait_until("the sentinel up", sentinel.ping)
        if self.replica_port is not None:  # it must know the replica to promote it
            wait_until(
                "the sentinel knowing the replica",
                lambda: any(
                    int(r["port"]) == self.replica_port
                    for r in sentinel.sentinel_slaves(MASTER_NAME)
                ),
            )
        return self

    def _server(self, name: str, port: int, *args: str) -> None:
        # No persistence: what a process held is lost with it, as a failover loses it.
        argv = ["--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                "--dir", str(self.folder), "--dbfilename", f"{name}.rdb", *args]  # fmt: skip
        self.procs[name] = self._spawn(name, argv)
        wait_until(f"redis-server {name} up", self.client(port).ping)

    def _spawn(self, name: str, argv: list[str]) -> subprocess.Popen[bytes]:
        log = (self.folder / f"{name}.log").open("wb")
        return subprocess.Popen([self.binary, *argv], stdout=log, stderr=subprocess.STDOUT)

    def stop(self) -> None:
        if self.proxy is not None:
            self.proxy.cut()
        for client in self._clients:
            client.close()
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
            proc.wait(10)

    # -- addresses ------------------------------------------------------------------------
    def url(self, db: int = 0, password: str | None = None) -> str:
        """farm's Sentinel URL for the master. A sentinel nobody runs is listed first: a
        client must ask the next one."""
        auth = f":{password}@" if password else ""
        down = free_port()
        return (
            f"sentinel://{auth}127.0.0.1:{down}/{db};sentinel://127.0.0.1:{self.sentinel_port}"
            f"?master_name={MASTER_NAME}"
        )

    def client(self, port: int) -> redis.Redis:
        """A client of one of the servers, by port (closed by stop())."""
        client = redis.Redis(port=port, decode_responses=True, socket_timeout=2)
        self._clients.append(client)
        return client

    def sentinel_client(self) -> redis.Redis:
        if not hasattr(self, "_sentinel"):
            self._sentinel = self.client(self.sentinel_port)
        return self._sentinel

    def master_now(self) -> int:
        """The port of the master the sentinel names now."""
        _host, port = self.sentinel_client().sentinel_get_master_addr_by_name(MASTER_NAME)
        return int(port)

    # -- the failure ----------------------------------------------------------------------
    def stop_replication(self) -> None:
        """Nothing the master writes from now on reaches the replica."""
        assert self.proxy is not None
        self.proxy.partition()

    def kill_master(self) -> None:
        """kill -9 the master: whatever it did not replicate is gone."""
        self.procs["master"].send_signal(signal.SIGKILL)
        self.procs["master"].wait(10)
        if self.proxy is not None:
            with contextlib.suppress(OSError):
                self.proxy.cut()

    def wait_promoted(self, timeout: float = 30.0) -> float:
        """Wait until the sentinel names the replica master; returns when it was seen."""
        assert self.replica_port is not None
        replica = self.client(self.replica_port)
        return wait_until(
            "the replica promoted",
            lambda: (
                self.master_now() == self.replica_port
                and replica.info("replication")["role"] == "master"
            ),
            timeout=timeout,
        )
