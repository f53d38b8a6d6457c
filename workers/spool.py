"""Usage writes kept while the registry is unreachable, written once it is back.

A job that ends while the registry is down still ends: its usage write goes to a spool
file under the farm's home (one per worker id, so a worker restarted under its name
writes what its predecessor kept), and the heartbeat replays it when the registry
answers again. A replay writes nothing twice: the usage row is completed only while it is
not ended yet (queries.record_finished).
"""

from __future__ import annotations

import json
import logging
import re
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from farm.registry import queries, transaction

log = logging.getLogger(__name__)


class UsageSpool:
    def __init__(self, folder: Path, worker_id: str):
        self.path = folder / f"{re.sub(r'[^A-Za-z0-9@._-]', '_', worker_id)}.jsonl"
        self._lock = threading.Lock()

    def add(
        self,
        job_id: str,
        status: str,
        row: dict[str, Any] | None,
        fields: dict[str, Any],
        line: dict[str, Any] | None = None,
    ) -> None:
        """Keep one usage write: `row` (session, model, priority, submitted_at) inserts the
        row if nobody recorded the job yet; `line` (batch, line, result) is a batch line's
        outcome, written on the line."""
        entry = {
            "job_id": job_id,
            "status": status,
            "row": row,
            "fields": {**fields, "finished_at": datetime.now(UTC).isoformat()},
            "line": line,
        }
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a", encoding="utf-8") as f:
                f.write(json.dumps(entry) + "\n")
        log.warning("registry unreachable: usage of job %s kept in %s", job_id, self.path)

    def pending(self) -> int:
        try:
            with self.path.open(encoding="utf-8") as f:
                return sum(1 for _ in f)
        except FileNotFoundError:
            return 0

    def flush(self, database_url: str) -> int:
        """Write every kept entry in one transaction; returns how many. FarmUnavailable
        (and the entries stay) while the registry is still unreachable."""
        with self._lock:
            try:
                lines = self.path.read_text(encoding="utf-8").splitlines()
            except FileNotFoundError:
                return 0
            entries, bad = [], []
            for line in lines:
                try:
                    if line.strip():
                        entries.append(json.loads(line))
                except ValueError:
                    bad.append(line)  # a torn write: kept aside, never blocking the rest
            if bad:
                with self.path.with_suffix(".bad").open("a", encoding="utf-8") as f:
                    f.write("\n".join(bad) + "\n")
                log.error("%d unreadable spool lines moved to %s", len(bad), f.name)
            with transaction(database_url) as s:
                for e in entries:
                    apply(s, e)
            self.path.unlink()
        if entries:
            log.info("wrote %d usage rows kept while the registry was unreachable", len(entries))
        return len(entries)


def apply(s: Any, entry: dict[str, Any]) -> None:
    fields = dict(entry["fields"])
    fields["finished_at"] = datetime.fromisoformat(fields["finished_at"])
    row = entry.get("row")
    if row is not None:
        queries.record_queued(
            s,
            job_id=entry["job_id"],
            session=row["session"],
            model=row["model"],
            priority=row["priority"],
            submitted_at=datetime.fromtimestamp(row["submitted_at"], UTC),
        )
    line = entry.get("line")
    if line is not None:
        queries.finish_batch_line(
            s,
            batch_id=line["batch"],
            line=line["line"],
            job_id=entry["job_id"],
            status=entry["status"],
            result=line.get("result"),
            error=fields.get("error"),
            finished_at=fields["finished_at"],
        )
    queries.record_finished(s, job_id=entry["job_id"], status=entry["status"], **fields)
