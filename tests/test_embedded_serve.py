"""`farm serve` beside `farm up`, and what both say: a gateway port that is taken refuses
to start (one line, exit 1), each says where it listens and whether keys are needed, a
`farm serve` keeps answering through restarts of `farm up` (same broker port, or another
one when the old is taken), and `farm up` sets its workers' slots (`--parallel`, or
`parallel` in the models file)."""

from __future__ import annotations

import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

import httpx
import pytest

from tests.conftest import MODEL, free_port, gemma_path, run_cli

pytestmark = pytest.mark.e2e


class Lines:
    """A process's stderr read as it comes, so a test waits for a line, not a guess."""

    def __init__(self, pipe: IO[str]):
        self.seen: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, args=(pipe,), daemon=True).start()

    def _read(self, pipe: IO[str]) -> None:
        for line in pipe:
            self._queue.put(line)
        self._queue.put(None)

    def wait_for(self, text: str, timeout: float = 120) -> str:
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"no line with {text!r} in {timeout}s:\n{self.text}") from None
            if line is None:
                raise AssertionError(f"exited before a line with {text!r}:\n{self.text}")
            self.seen.append(line)
            if text in line:
                return line

    @property
    def text(self) -> str:
        return "".join(self.seen)


def bare_env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FARM_")}
    env.update({"FARM_HOME": str(home), "PYTHONUNBUFFERED": "1"})
    return env


@contextmanager
def running(env: dict[str, str], *args: str) -> Iterator[tuple[subprocess.Popen[str], Lines]]:
    """`farm ARGS` in a session of its own; Ctrl-C'd (and waited for) at the end."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "farm.cli", *args],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    assert proc.stderr is not None
    try:
        yield proc, Lines(proc.stderr)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGINT)
        proc.wait(90)


@contextmanager
def listening(port: int = 0) -> Iterator[int]:
    """Something else listening on 127.0.0.1:PORT (a free one for 0)."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", port))
        sock.listen()
        yield int(sock.getsockname()[1])


def complete(base: str, key: str | None = None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(
        f"{base}/completions",
        json={"model": MODEL, "prompt": "Hello", "max_tokens": 4},
        headers=headers,
        timeout=120,
    )


def slots(env: dict[str, str]) -> list[int]:
    r = run_cli(env, "status", "--json")
    assert r.returncode == 0, r.stderr
    return [w["slots"] for w in json.loads(r.stdout)["workers"] if w["state"] == "ready"]


def broker_url(home: Path) -> str:
    return str(json.loads((home / "farm.json").read_text())["broker_url"])


def refused_for_its_port(r: subprocess.CompletedProcess[str], port: int) -> bool:
    """One clear line naming the port and what to do; not uvicorn's `[Errno 98]`."""
    return (
        r.returncode == 1
        and r.stderr.count(f"port {port} on 127.0.0.1 is taken") == 1
        and "pass a free one with --port N" in r.stderr
        and "Errno" not in r.stderr
        and "Traceback" not in r.stderr
    )


def test_farm_up_on_a_taken_gateway_port_refuses_once_and_starts_nothing(tmp_path):
    env = bare_env(tmp_path)
    with listening() as taken:
        r = run_cli(env, "up", "--port", str(taken))
        assert refused_for_its_port(r, taken), r.stderr
    assert not (tmp_path / "farm.json").exists()  # no half farm: no broker, no worker
    assert not (tmp_path / "broker").exists()


def test_farm_serve_follows_restarts_of_farm_up_and_both_say_where_and_whether_keys_are_needed(
    tmp_path,
):
    home = tmp_path / "home"
    home.mkdir()
    env = bare_env(home)
    (home / "models.toml").write_text(
        f'[models.{MODEL}]\npath = "{gemma_path()}"\nchat_format = "gemma"\nparallel = 2\n'
    )
    up_port, serve_port = free_port(), free_port()
    serve_url = f"http://127.0.0.1:{serve_port}/v1"
    with running(env, "up", "--port", str(up_port)) as (first, up):
        line = up.wait_for("gateway  ")
        assert f"http://127.0.0.1:{up_port}/v1" in line and "no API key needed" in line
        up.wait_for("farm is up")
        assert slots(env) == [2]  # the models file's `parallel`
        first_broker = broker_url(home)

        # Its process stays (tests/test_gateway_recycle.py replaces one): the lines it says
        # when it follows the farm are what this test reads.
        serve_env = {**env, "FARM_GATEWAY_RECYCLE_IDLE": "3600"}
        with running(serve_env, "serve", "--port", str(serve_port)) as (serve_proc, serve):
            ready = serve.wait_for("farm serve ready")
            assert serve_url in ready and "no API key needed" in ready
            assert complete(serve_url).status_code == 200

            # Taken by the farm's own gateway: refused with the port named, nothing else.
            r = run_cli(env, "serve", "--port", str(up_port))
            assert refused_for_its_port(r, up_port), r.stderr

            key = run_cli(env, "keys", "create", "--session", "alice").stdout.strip()
            assert complete(serve_url).status_code == 401

            # Restarted at once: the same broker port (its closed connections linger in
            # TIME_WAIT, which must not move it), and --parallel beats the models file.
            os.killpg(first.pid, signal.SIGINT)
            assert first.wait(90) == 0
            with running(env, "up", "--port", str(up_port), "--parallel", "3") as (again, up2):
                line = up2.wait_for("gateway  ")
                assert "API keys required" in line and "farm keys create" in line
                up2.wait_for("farm is up")
                assert broker_url(home) == first_broker
                assert slots(env) == [3]
                assert complete(serve_url, key).status_code == 200

                # Its old port taken while it was down: the broker moves, and says so;
                # `farm serve` follows it.
                os.killpg(again.pid, signal.SIGINT)
                assert again.wait(90) == 0
                old_port = int(first_broker.rsplit(":", 1)[1].split("/")[0])
                with listening(old_port), running(env, "up", "--port", str(up_port)) as (_, up3):
                    up3.wait_for(f"port {old_port} is taken now; the broker moves to")
                    up3.wait_for("farm is up")
                    assert broker_url(home) != first_broker
                    serve.wait_for("following the farm `farm up` runs here")
                    assert complete(serve_url, key).status_code == 200
                    # Remembered by `farm serve`, refused on the next request once revoked
                    # (the token goes through the broker's append-only file: WAITAOF).
                    revoked = run_cli(env, "keys", "revoke", key)
                    assert revoked.returncode == 0 and "revoked" in revoked.stdout, revoked
                    assert complete(serve_url, key).status_code == 401
            assert serve_proc.poll() is None
