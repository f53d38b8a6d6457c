"""A worker's place in the registry: registration, leases, and the heartbeat that renews them.

A worker registers and takes its leases only once its models are loaded, warmed up and the
Celery consumer is ready. It holds a lease for every model it serves, marked loaded or not
(a model it loads on demand). A background thread renews the leases, unloads models idle
past their keep-alive, and reaps workers that stopped renewing theirs. A clean stop drops
the leases at once.
"""

from __future__ import annotations

import logging
import os
import platform
import socket
import threading
from importlib.metadata import PackageNotFoundError, version

from farm.context import FarmContext
from farm.errors import WorkerStartError
from farm.recovery import reap_lost_workers
from farm.registry import queries, transaction
from farm.registry.queries import LeaseSpec
from farm.registry.tables import WorkerRecord
from workers.models import ModelCache

log = logging.getLogger(__name__)


def versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for dist in ("farm", "celery", "kombu", "llama-cpp-python"):
        try:
            found[dist] = version(dist)
        except PackageNotFoundError:
            continue
    return found


def claim_device(ctx: FarmContext, worker_id: str, device: str) -> None:
    """Refuse to start when a live worker on this host already uses `device` (not 'cpu')."""
    if device == "cpu":
        return
    host = socket.gethostname()
    with transaction(ctx.database_url) as s:
        for lease in queries.live_leases(s):
            worker = s.get(WorkerRecord, lease.worker_id)
            if worker and worker.id != worker_id and worker.host == host and lease.device == device:
                raise WorkerStartError(
                    f"device {device} on {host} is already used by worker {worker.id} "
                    f"(pid {worker.pid}); pick another --device or stop that worker"
                )


class Membership:
    """Registers the worker and keeps its leases in step with its ModelCache."""

    def __init__(self, ctx: FarmContext, worker_id: str, cache: ModelCache, device: str):
        self.ctx = ctx
        self.worker_id = worker_id
        self.cache = cache
        self.device = device
        self.joined = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def join(self) -> None:
        """Register the worker, lease its models, and start the heartbeat."""
        with transaction(self.ctx.database_url) as s:
            queries.register_worker(
                s,
                worker_id=self.worker_id,
                host=socket.gethostname(),
                pid=os.getpid(),
                device=self.device,
                versions=versions(),
            )
        self.joined = True
        self.sync()
        log.info("worker %s serves %s", self.worker_id, ", ".join(self.cache.specs))
        self._thread = threading.Thread(target=self._beat, name="farm-heartbeat", daemon=True)
        self._thread.start()

    def sync(self) -> None:
        """Write the cache's models to the registry as this worker's leases."""
        if not self.joined:
            return
        loaded = set(self.cache.loaded())
        leases = [
            LeaseSpec(name, name in loaded, name in self.cache.pinned, self.cache.sizes[name])
            for name in self.cache.specs
        ]
        with transaction(self.ctx.database_url) as s:
            queries.set_leases(
                s,
                worker_id=self.worker_id,
                device=self.device,
                leases=leases,
                ttl=self.ctx.settings.lease_ttl,
            )

    def _beat(self) -> None:
        settings = self.ctx.settings
        while not self._stop.wait(settings.heartbeat_interval):
            try:
                with transaction(self.ctx.database_url) as s:
                    held = queries.heartbeat(s, worker_id=self.worker_id, ttl=settings.lease_ttl)
                if held < len(self.cache.specs):
                    # Marked lost during a stall while still alive: lease again.
                    self.sync()
                self.cache.unload_idle()
                reap_lost_workers(self.ctx)
            except Exception:
                log.exception("heartbeat of worker %s failed; retrying", self.worker_id)

    def leave(self) -> None:
        """Stop renewing and drop the leases: the worker no longer serves."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        with transaction(self.ctx.database_url) as s:
            queries.release_worker(s, worker_id=self.worker_id)
        log.info("worker %s released its leases", self.worker_id)
