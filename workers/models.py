"""The models one worker may serve, and which of them are loaded, within a memory budget.

- A worker may serve several models (`farm worker --models a,b`); it consumes all of
  their queues and loads a model when a job for it arrives (on demand).
- Loaded models fit the memory budget together. To make room, the least recently used
  model that is not pinned and runs no sequence is unloaded: each job holds its model
  (`use`) while it runs, so nothing is unloaded under a running sequence. A load that can
  only fit once running jobs end waits for them.
- With a keep-alive, a model not used for that long is unloaded (pinned ones stay).

A model's size is its GGUF file's size: the weights llama.cpp maps in. The KV cache comes
on top (n_ctx dependent), so leave headroom in the budget.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from farm.errors import InvalidRequest, JobFailed, WorkerStartError
from workers.host import EngineOptions, ModelHost
from workers.spec import ModelSpec

log = logging.getLogger(__name__)

_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3,
          "gb": 1000**3, "t": 1000**4, "tb": 1000**4, "kib": 1024, "mib": 1024**2,
          "gib": 1024**3, "tib": 1024**4}  # fmt: skip


def parse_size(text: str) -> int:
    """'20GiB', '512MiB', '1.5GB', '1000000' -> bytes."""
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in _UNITS:
        raise InvalidRequest(f"invalid size '{text}': write it like 20GiB, 512MiB or 8GB")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def human(n: int) -> str:
    return f"{n / 1024**2:.0f} MiB" if n < 1024**3 else f"{n / 1024**3:.1f} GiB"


def model_size(spec: ModelSpec) -> int:
    try:
        return Path(spec.path).stat().st_size
    except OSError:
        return 0


class ModelCache:
    """Loads, keeps and evicts the models of one worker. Thread-safe."""

    def __init__(
        self,
        specs: list[ModelSpec],
        *,
        budget: int | None = None,
        pinned: frozenset[str] = frozenset(),
        keep_alive: float | None = None,
        on_change: Callable[[], None] = lambda: None,
        options: EngineOptions | None = None,
        host_factory: Callable[[ModelSpec, EngineOptions], ModelHost] = ModelHost,
    ):
        self.specs = {s.name: s for s in specs}
        self.budget = budget
        self.pinned = set(pinned)
        self.keep_alive = keep_alive
        self.on_change = on_change
        self.options = options or EngineOptions()
        self._new_host = host_factory
        self.sizes = {s.name: model_size(s) for s in specs}
        self.hosts: OrderedDict[str, ModelHost] = OrderedDict()  # least recently used first
        self.last_used: dict[str, float] = {}
        self.in_use: dict[str, int] = {}  # running jobs per loaded model
        self.lock = threading.RLock()
        self.released = threading.Condition(self.lock)  # notified when a job lets go
        self._check_budget()

    def _check_budget(self) -> None:
        unknown = self.pinned - set(self.specs)
        if unknown:
            raise WorkerStartError(f"cannot pin {', '.join(sorted(unknown))}: not among --models")
        if self.budget is None:
            return
        for name, size in self.sizes.items():
            if size > self.budget:
                raise WorkerStartError(
                    f"model '{name}' needs {human(size)} but the memory budget is "
                    f"{human(self.budget)}; raise --memory-budget or serve it elsewhere"
                )
        pinned = sum(self.sizes[n] for n in self.pinned)
        if pinned > self.budget:
            raise WorkerStartError(
                f"the pinned models need {human(pinned)} together but the memory budget is "
                f"{human(self.budget)}"
            )

    # -- state -----------------------------------------------------------------------------
    @property
    def used(self) -> int:
        return sum(self.sizes[n] for n in self.hosts)

    def loaded(self) -> list[str]:
        return list(self.hosts)

    def device(self) -> str:
        for host in self.hosts.values():
            return host.device
        return "cpu"

    # -- loading and unloading ---------------------------------------------------------------------
    def add(self, spec: ModelSpec) -> None:
        """Allow this worker to serve one more model (a `farm models load` of a new one)."""
        with self.lock:
            self.specs[spec.name] = spec
            self.sizes[spec.name] = model_size(spec)
            if self.budget is not None and self.sizes[spec.name] > self.budget:
                del self.specs[spec.name]
                raise InvalidRequest(
                    f"model '{spec.name}' needs {human(self.sizes.pop(spec.name))} but the "
                    f"memory budget is {human(self.budget)}"
                )

    def remove(self, name: str) -> None:
        """Stop serving a model added with `add` (after its load failed)."""
        with self.lock:
            if name in self.hosts:
                self._unload(name)
            self.specs.pop(name, None)
            self.sizes.pop(name, None)

    def preload(self) -> None:
        """Load pinned models, then the others in order while they fit without evicting."""
        order = [n for n in self.specs if n in self.pinned] + [
            n for n in self.specs if n not in self.pinned
        ]
        for name in order:
            if self.budget is None or self.used + self.sizes[name] <= self.budget:
                self.load(name)

    def load(self, name: str) -> ModelHost:
        """The loaded model, loading it (and evicting others to fit) if needed."""
        with self.lock:
            host = self.hosts.get(name)
            if host is not None:
                self.hosts.move_to_end(name)
                return host
            spec = self.specs.get(name)
            if spec is None:
                raise JobFailed(f"this worker does not serve model '{name}'")
            self._make_room(name)
            started = time.perf_counter()
            host = self._new_host(spec, self.options)
            host.load()
            try:
                host.warm_up()
            except BaseException:
                host.close()  # a failed warm-up leaves no weights or engine behind
                raise
            self.hosts[name] = host
            self.last_used[name] = time.monotonic()
            log.info(
                "loaded %s in %.2fs (%s of %s)",
                name,
                time.perf_counter() - started,
                human(self.used),
                human(self.budget) if self.budget else "no budget",
            )
        self.on_change()
        return host

    def _make_room(self, name: str) -> None:
        if self.budget is None:
            return
        need = self.sizes[name]
        while True:
            for victim in list(self.hosts):  # least recently used first
                if self.used + need <= self.budget:
                    return
                if victim not in self.pinned and not self.in_use.get(victim):
                    log.info("evicting %s (least recently used) to load %s", victim, name)
                    self._unload(victim)
            busy = [n for n in self.hosts if n not in self.pinned and self.in_use.get(n)]
            if self.used + need <= self.budget or not busy:
                break
            # Room is held by models with jobs running: wait for one of them to end.
            self.released.wait(timeout=1.0)
        if self.used + need > self.budget:
            raise JobFailed(
                f"cannot load model '{name}' ({human(need)}): the pinned models "
                f"({', '.join(sorted(self.pinned))}) leave too little of the "
                f"{human(self.budget)} memory budget"
            )

    def unload(self, name: str) -> bool:
        with self.lock:
            if name not in self.hosts:
                return False
            self._unload(name)
        self.on_change()
        return True

    def _unload(self, name: str) -> None:
        # Only between jobs: wait until no sequence of this model runs.
        while self.in_use.get(name):
            self.released.wait(timeout=1.0)
        self.hosts.pop(name).close()
        log.info("unloaded %s", name)

    @contextmanager
    def use(self, name: str) -> Iterator[ModelHost]:
        """Hold a model for one job: nothing can unload it until the job ends. Many jobs
        may hold the same model at once; its engine runs them together."""
        with self.lock:
            host = self.load(name)
            self.in_use[name] = self.in_use.get(name, 0) + 1
        try:
            yield host
        finally:
            with self.lock:
                self.in_use[name] -= 1
                self.last_used[name] = time.monotonic()
                self.released.notify_all()

    def busy_slots(self) -> int:
        return sum(self.in_use.values())

    def slots(self) -> int:
        return self.options.slots

    def tokens_generated(self) -> int:
        return sum(h.engine.tokens_generated for h in list(self.hosts.values()) if h.engine)

    def unload_idle(self) -> list[str]:
        """Unload models unused for longer than the keep-alive (never during a job)."""
        if self.keep_alive is None or not self.lock.acquire(blocking=False):
            return []
        try:
            now = time.monotonic()
            idle = [
                n for n in self.hosts
                if n not in self.pinned and not self.in_use.get(n)
                and now - self.last_used.get(n, now) > self.keep_alive
            ]  # fmt: skip
            for name in idle:
                self._unload(name)
        finally:
            self.lock.release()
        if idle:
            self.on_change()
        return idle

    def close(self) -> None:
        with self.lock:
            for name in list(self.hosts):
                self._unload(name)
