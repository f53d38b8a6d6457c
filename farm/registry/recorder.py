"""Usage rows of queued jobs, written behind the submit: batched, off the caller's path.

A submit publishes the job, hands its row to this recorder, and returns; a thread writes
the rows that gathered meanwhile in one transaction, within milliseconds. On SQLite a
transaction per submit cost more than Celery's whole publish; this keeps farm.submit near
Celery's own rate. What the guarantees rest on:

- the job's row never goes missing: the worker inserts it when it starts, expires or
  fails the job if the client's write has not landed (an upsert; usage is written once);
- this process sees its own jobs: `flush()` runs before reading or cancelling a job here,
  and at exit;
- another process may, for a few milliseconds after a submit, not find the job yet; where
  a job's id is handed to another process (the gateway's `x-request-id` on a stream), the
  hand-over waits for `flush()` first.
"""

from __future__ import annotations

import atexit
import logging
import threading
from typing import Any

from farm.errors import FarmUnavailable
from farm.registry import queries
from farm.registry.db import transaction

log = logging.getLogger(__name__)

LINGER_S = 0.002  # gather the rows of a burst into one transaction


class QueuedRows:
    """Writes `record_queued` rows in batches from a background thread."""

    def __init__(self, database_url: str):
        self.database_url = database_url
        self._rows: list[dict[str, Any]] = []
        self._cond = threading.Condition()
        self._added = 0  # rows ever added, and ever written (or given up on)
        self._done = 0
        self._thread: threading.Thread | None = None
        atexit.register(self.flush)

    def add(self, rows: list[dict[str, Any]]) -> None:
        with self._cond:
            self._rows.extend(rows)
            self._added += len(rows)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="farm-rows", daemon=True)
                self._thread.start()
            self._cond.notify()

    def flush(self, timeout: float = 10.0) -> None:
        """Return once every row added so far is written (or could not be: logged). Rows
        added meanwhile are not waited for, so a flush under a steady stream of submits
        returns after one or two batches."""
        with self._cond:
            target = self._added
            self._cond.notify()
            self._cond.wait_for(lambda: self._done >= target, timeout)

    def _run(self) -> None:
        while True:
            with self._cond:
                if not self._cond.wait_for(lambda: bool(self._rows), timeout=60):
                    self._thread = None
                    return
            threading.Event().wait(LINGER_S)
            with self._cond:
                rows, self._rows = self._rows, []
            try:
                with transaction(self.database_url) as s:
                    queries.record_queued_many(s, rows)
            except FarmUnavailable as e:
                # The jobs are queued; each worker writes its job's row when it starts it.
                log.warning("%d queued jobs not recorded yet (the worker will): %s", len(rows), e)
            except Exception:
                log.exception("could not record %d queued jobs; workers will", len(rows))
            finally:
                with self._cond:
                    self._done += len(rows)
                    self._cond.notify_all()
