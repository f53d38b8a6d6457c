"""A worker's place in the registry: registration, leases, and the heartbeat that renews them.

A worker registers and takes a lease per model only once the model is loaded, warmed up and
the Celery consumer is ready. A background thread renews the leases; a lease that is not
renewed expires and the worker counts as lost. A clean stop drops the leases at once.
"""

from __future__ import annotations

import logging
import os
import platform
import socket
import threading
from importlib.metadata import PackageNotFoundError, version

from farm.context import FarmContext
from farm.recovery import reap_lost_workers
from farm.registry import queries, transaction

log = logging.getLogger(__name__)


def versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for dist in ("farm", "celery", "kombu", "llama-cpp-python"):
        try:
            found[dist] = version(dist)
        except PackageNotFoundError:
            continue
    return found


class Membership:
    """Registers the worker and keeps its leases alive until `leave()`."""

    def __init__(self, ctx: FarmContext, worker_id: str, device: str, models: list[str]):
        self.ctx = ctx
        self.worker_id = worker_id
        self.device = device
        self.models = models
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def join(self) -> None:
        """Register the worker, lease its models, and start renewing the leases."""
        settings = self.ctx.settings
        with transaction(self.ctx.database_url) as s:
            queries.register_worker(
                s,
                worker_id=self.worker_id,
                host=socket.gethostname(),
                pid=os.getpid(),
                device=self.device,
                versions=versions(),
            )
            for model in self.models:
                queries.take_lease(
                    s,
                    worker_id=self.worker_id,
                    model=model,
                    device=self.device,
                    ttl=settings.lease_ttl,
                )
        log.info("worker %s holds leases on %s", self.worker_id, ", ".join(self.models))
        self._thread = threading.Thread(target=self._beat, name="farm-heartbeat", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        settings = self.ctx.settings
        while not self._stop.wait(settings.heartbeat_interval):
            try:
                with transaction(self.ctx.database_url) as s:
                    held = queries.heartbeat(s, worker_id=self.worker_id, ttl=settings.lease_ttl)
                    if held < len(self.models):
                        # Someone marked us lost while we were alive (a long stall): lease again.
                        for model in self.models:
                            queries.take_lease(
                                s,
                                worker_id=self.worker_id,
                                model=model,
                                device=self.device,
                                ttl=settings.lease_ttl,
                            )
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
