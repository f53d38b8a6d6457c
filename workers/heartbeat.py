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
import time
from datetime import timedelta
from importlib.metadata import PackageNotFoundError, version

from farm.admission.aging import age_queues
from farm.broker import requeue_unacked
from farm.context import FarmContext
from farm.errors import FarmUnavailable, WorkerStartError
from farm.failover import BrokerWatch
from farm.fair import fleet
from farm.local import pid_alive
from farm.recovery import expire_orphaned_rows, mark_queued, reap_lost_workers
from farm.registry import queries, transaction
from farm.registry.queries import LeaseSpec
from farm.registry.tables import ACTIVE_WORKER_STATES, as_utc, utcnow
from workers.host import EngineOptions
from workers.models import ModelCache
from workers.spool import UsageSpool

log = logging.getLogger(__name__)

RECONCILE_EVERY_S = 60.0


def versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for dist in ("farm", "celery", "kombu", "llama-cpp-python"):
        try:
            found[dist] = version(dist)
        except PackageNotFoundError:
            continue
    return found


def claim(
    ctx: FarmContext, worker_id: str, device: str, *, slots: int = 1, threads: int = 1
) -> None:
    """Take the worker's id and device, or refuse with the reason. Run before loading.

    - The same id alive elsewhere (a fresh heartbeat, or a live process on this host): refuse.
    - The same id whose process died (restarted under systemd, say): its job goes back to
      the queue now, instead of waiting for a lease to expire under the new process.
    - The same device (not 'cpu') used by another live worker on this host: refuse.
    """
    host = socket.gethostname()
    fresh = utcnow() - timedelta(seconds=ctx.settings.lease_ttl)
    orphans: list[str] = []
    with transaction(ctx.database_url) as s:
        old = queries.get_worker(s, worker_id)
        if old is not None and old.state in ACTIVE_WORKER_STATES:
            beating = as_utc(old.heartbeat_at) > fresh
            if old.host == host and old.pid != os.getpid() and pid_alive(old.pid) and beating:
                raise WorkerStartError(
                    f"a worker named {worker_id} is already running here (pid {old.pid}); "
                    "stop it or give this one another --name"
                )
            if old.host != host and beating:
                raise WorkerStartError(
                    f"a worker named {worker_id} is already running on {old.host}; "
                    "give this one another --name"
                )
            orphans = queries.running_jobs(s, worker_id).get(worker_id, [])
        if device != "cpu":
            others = queries.device_users(
                s, host=host, device=device, beating_since=fresh, other_than=worker_id
            )
            for other in others:
                if pid_alive(other.pid):  # a dead owner's row does not hold the device
                    raise WorkerStartError(
                        f"device {device} on {host} is already used by worker {other.id} "
                        f"(pid {other.pid}); pick another --device or stop that worker"
                    )
        # Also drops the dead predecessor's leases, which would otherwise look alive.
        queries.register_worker(
            s,
            worker_id=worker_id,
            host=host,
            pid=os.getpid(),
            device=device,
            versions=versions(),
            slots=slots,
            threads=threads,
        )
    # Every refusal is behind us and the claim is committed: only now touch the broker.
    requeued = requeue_unacked(ctx.app, orphans)
    mark_queued(ctx, worker_id, requeued)
    for job_id in sorted(requeued):
        log.warning("worker %s died holding job %s; it is queued again", worker_id, job_id)


class Membership:
    """Registers the worker and keeps its leases in step with its ModelCache."""

    def __init__(self, ctx: FarmContext, worker_id: str, device: str):
        self.ctx = ctx
        self.worker_id = worker_id
        self.cache: ModelCache | None = None
        self.options: EngineOptions | None = None
        self.device = device
        self._tokens_seen: tuple[float, int] | None = None  # (monotonic, tokens) last beat
        self.spool: UsageSpool | None = None
        self._reap_after = 0.0  # monotonic time before which this worker reaps nobody
        self._next_reconcile = 0.0
        self.watch = BrokerWatch(ctx)
        self.begun = False
        self.joined = False
        self._sync_lock = threading.Lock()  # the heartbeat and the main thread both sync
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def begin(self) -> None:
        """Claim the id and device (registered as starting) and start the heartbeat."""
        opts = self.options or EngineOptions()
        claim(self.ctx, self.worker_id, self.device, slots=opts.slots, threads=opts.threads)
        self.begun = True
        self._thread = threading.Thread(target=self._beat, name="farm-heartbeat", daemon=True)
        self._thread.start()

    def join(self, device: str) -> None:
        """The models are loaded and the consumer is ready: lease them, the worker serves."""
        self.device = device
        with transaction(self.ctx.database_url) as s:
            queries.set_worker_device(s, worker_id=self.worker_id, device=device)
        self._write_leases()
        self.joined = True
        if self.cache is not None:  # this worker's slots join the caps; held jobs move now
            try:
                fleet.refresh(self.ctx, list(self.cache.specs))
            except Exception as e:  # the next heartbeat does it
                log.warning("worker %s: fair-share caps not written yet: %s", self.worker_id, e)
        log.info(
            "worker %s serves %s", self.worker_id, ", ".join(self.cache.specs if self.cache else ())
        )

    def sync(self) -> None:
        """Write the cache's models to the registry as this worker's leases (once joined)."""
        if self.joined:
            self._write_leases()

    def _write_leases(self) -> None:
        cache = self.cache
        if cache is None:
            return
        with self._sync_lock:
            loaded = set(cache.loaded())
            leases = [
                LeaseSpec(name, name in loaded, name in cache.pinned, cache.sizes[name])
                for name in list(cache.specs)
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
                    held = queries.heartbeat(
                        s,
                        worker_id=self.worker_id,
                        ttl=settings.lease_ttl,
                        tokens_per_s=self._tokens_per_s(),
                    )
                if self.joined and self.cache and held != len(self.cache.specs):
                    # Marked lost during a stall, or serving more or fewer models: lease again.
                    self.sync()
                if self.spool is not None:
                    self.spool.flush(self.ctx.database_url)
                if self.joined and self.cache:
                    self.cache.unload_idle()
                    fleet.refresh(self.ctx, list(self.cache.specs))  # caps, fair dispatch
                    age_queues(self.ctx, list(self.cache.specs))  # bounded waits
                    self._watch_broker()  # a broker that failed over: its lost jobs expire
                    if time.monotonic() >= self._reap_after:
                        reap_lost_workers(self.ctx)
                        if time.monotonic() >= self._next_reconcile:
                            self._next_reconcile = time.monotonic() + RECONCILE_EVERY_S
                            expire_orphaned_rows(self.ctx)
            except FarmUnavailable as e:
                # Nobody could renew a lease meanwhile: after the outage, give every live
                # worker a lease's time to renew before judging any of them lost.
                self._reap_after = time.monotonic() + settings.lease_ttl
                log.warning("heartbeat of worker %s failed; retrying: %s", self.worker_id, e)
            except Exception:
                self._reap_after = time.monotonic() + settings.lease_ttl
                log.exception("heartbeat of worker %s failed; retrying", self.worker_id)

    def _watch_broker(self) -> None:
        try:
            self.watch.step()
        except Exception as e:  # the next beat tries again; nothing else waits for it
            log.warning("worker %s: reconciling with the broker failed: %s", self.worker_id, e)

    def _tokens_per_s(self) -> float | None:
        """Tokens generated per second since the last beat, over all this worker's models."""
        if self.cache is None:
            return None
        now, total = time.monotonic(), self.cache.tokens_generated()
        last, self._tokens_seen = self._tokens_seen, (now, total)
        if last is None or now <= last[0]:
            return None
        return round(max(0, total - last[1]) / (now - last[0]), 1)

    def leave(self) -> None:
        """Stop renewing and drop the leases: the worker no longer serves."""
        if not self.begun:
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        with transaction(self.ctx.database_url) as s:
            queries.release_worker(s, worker_id=self.worker_id)
        log.info("worker %s released its leases", self.worker_id)
