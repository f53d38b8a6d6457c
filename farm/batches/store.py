"""Batches in the registry: create one (idempotently, by name), read it, cancel it, and
read its lines' outcomes. Every function takes the caller's session; none commits."""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from farm.batches.lines import Line
from farm.errors import InvalidRequest, UnknownBatch
from farm.registry.tables import BatchLineRecord, BatchRecord, FileRecord, as_utc, utcnow

ACTIVE = ("in_progress", "cancelling")
ENDED = ("completed", "failed", "expired", "cancelled")
LINE_DONE = ("succeeded", "failed", "cancelled", "expired")
DEFAULT_WINDOW = "24h"
_WINDOW_RE = re.compile(r"^(\d+)([mhd])$")
_UNIT_S = {"m": 60, "h": 3600, "d": 86400}


def window_seconds(text: str) -> int:
    """'24h', '90m', '7d': the completion window in seconds (1 minute to 30 days)."""
    found = _WINDOW_RE.match(text.strip())
    seconds = int(found.group(1)) * _UNIT_S[found.group(2)] if found else 0
    if not 60 <= seconds <= 30 * 86400:
        raise InvalidRequest(
            f"invalid 'completion_window': {text!r}; give minutes, hours or days from 1m to "
            "30d, such as 24h"
        )
    return seconds


def window_text(seconds: int) -> str:
    for unit in ("d", "h", "m") if seconds >= 7 * 86400 else ("h", "m"):
        if seconds % _UNIT_S[unit] == 0:
            return f"{seconds // _UNIT_S[unit]}{unit}"
    return f"{seconds}s"


@dataclass(frozen=True)
class Batch:
    """A batch as read from the registry, with its lines counted by status."""

    id: str
    name: str
    session: str
    priority: str
    endpoint: str
    status: str
    total: int
    counts: dict[str, int]
    created_at: datetime
    expires_at: datetime
    completion_window_s: int
    input_file_id: str | None
    meta: dict[str, Any]
    content_hash: str
    ended_at: dict[str, datetime | None] = field(default_factory=dict)

    @property
    def succeeded(self) -> int:
        return self.counts.get("succeeded", 0)

    @property
    def failed(self) -> int:
        """Lines that did not succeed: failed, cancelled or expired."""
        return sum(self.counts.get(k, 0) for k in ("failed", "cancelled", "expired"))

    @property
    def done(self) -> int:
        return self.succeeded + self.failed

    @property
    def ended(self) -> bool:
        return self.status in ENDED

    @property
    def output_file_id(self) -> str | None:
        return f"file-{self.id}-output" if self.ended and self.succeeded else None

    @property
    def error_file_id(self) -> str | None:
        return f"file-{self.id}-errors" if self.ended and self.failed else None

    def eta_s(self, now: datetime | None = None) -> float | None:
        """Seconds until the last line ends, at the rate lines have ended so far."""
        if self.ended or not self.done:
            return None
        elapsed = ((now or utcnow()) - self.created_at).total_seconds()
        return elapsed / self.done * (self.total - self.done) if elapsed > 0 else None

    def to_json(self) -> dict[str, Any]:
        """OpenAI's batch object, with farm's own fields beside it."""

        def stamp(dt: datetime | None) -> int | None:
            return int(dt.timestamp()) if dt is not None else None

        eta = self.eta_s()
        return {
            "id": self.id,
            "object": "batch",
            "endpoint": self.endpoint,
            "errors": None,
            "input_file_id": self.input_file_id or "",
            "completion_window": window_text(self.completion_window_s),
            "status": self.status,
            "output_file_id": self.output_file_id,
            "error_file_id": self.error_file_id,
            "created_at": stamp(self.created_at),
            "in_progress_at": stamp(self.created_at),
            "expires_at": stamp(self.expires_at),
            **{f"{k}_at": stamp(v) for k, v in self.ended_at.items()},
            "request_counts": {
                "total": self.total,
                "completed": self.succeeded,
                "failed": self.failed,
            },
            "metadata": self.meta or None,
            # farm's own
            "name": self.name,
            "session": self.session,
            "priority": self.priority,
            "lines": {k: self.counts.get(k, 0) for k in ("pending", "queued", *LINE_DONE)},
            "eta_s": round(eta, 1) if eta is not None else None,
        }


def new_id() -> str:
    return f"batch_{uuid.uuid4().hex[:24]}"


def find_by_name(s: Session, name: str) -> BatchRecord | None:
    return s.scalar(select(BatchRecord).where(BatchRecord.name == name))


class NameTaken(Exception):
    """Another batch of that name was created meanwhile (the caller's transaction is lost)."""


def create(
    s: Session,
    *,
    lines: list[Line],
    name: str,
    session: str,
    priority: str,
    content_hash: str,
    window_s: int,
    input_file_id: str | None = None,
    meta: dict[str, Any] | None = None,
) -> BatchRecord:
    """A new batch and its lines, all pending: the feeder queues them from here."""
    now = utcnow()
    urls = {line.url or ("/v1/chat/completions" if line.chat else "/v1/completions")
            for line in lines}  # fmt: skip
    endpoint = urls.pop() if len(urls) == 1 else "mixed"
    record = BatchRecord(
        id=new_id(),
        name=name,
        session=session,
        priority=priority,
        endpoint=endpoint,
        status="in_progress",
        total=len(lines),
        content_hash=content_hash,
        input_file_id=input_file_id,
        completion_window_s=window_s,
        meta=meta or {},
        created_at=now,
        expires_at=now + timedelta(seconds=window_s),
    )
    s.add(record)
    try:
        s.flush()
    except IntegrityError as e:  # the same name created at the same moment elsewhere
        raise NameTaken(name) from e
    rows = [
        {
            "batch_id": record.id,
            "line": line.number,
            "custom_id": line.custom_id,
            "model": line.request["model"],
            "chat": line.chat,
            "request": line.request,
            "status": "pending",
            "attempts": 0,
        }
        for line in lines
    ]
    for start in range(0, len(rows), 5000):
        s.execute(insert(BatchLineRecord), rows[start : start + 5000])
    return record


def counts(s: Session, batch_ids: list[str]) -> dict[str, dict[str, int]]:
    """Each batch's lines by status."""
    found: dict[str, dict[str, int]] = {b: {} for b in batch_ids}
    if batch_ids:
        rows = s.execute(
            select(BatchLineRecord.batch_id, BatchLineRecord.status, func.count())
            .where(BatchLineRecord.batch_id.in_(batch_ids))
            .group_by(BatchLineRecord.batch_id, BatchLineRecord.status)
        )
        for batch_id, status, n in rows:
            found[batch_id][status] = int(n)
    return found


def view(record: BatchRecord, line_counts: dict[str, int]) -> Batch:
    return Batch(
        id=record.id,
        name=record.name,
        session=record.session,
        priority=record.priority,
        endpoint=record.endpoint,
        status=record.status,
        total=record.total,
        counts=line_counts,
        created_at=as_utc(record.created_at),
        expires_at=as_utc(record.expires_at),
        completion_window_s=record.completion_window_s,
        input_file_id=record.input_file_id,
        meta=dict(record.meta or {}),
        content_hash=record.content_hash,
        ended_at={
            k: as_utc(v) if v is not None else None
            for k, v in (
                ("finalizing", record.finalizing_at),
                ("completed", record.completed_at),
                ("cancelling", record.cancelling_at),
                ("cancelled", record.cancelled_at),
                ("expired", record.expired_at),
                ("failed", record.failed_at),
            )
        },
    )


def get(s: Session, batch_id: str, *, session: str | None = None) -> Batch:
    """The batch by id or name; UnknownBatch when there is none (or it is another
    session's, when `session` is given)."""
    record = s.get(BatchRecord, batch_id) or find_by_name(s, batch_id)
    if record is None or (session is not None and record.session != session):
        raise UnknownBatch(
            f"no batch '{batch_id}'; `farm batch list` shows the batches and their ids"
        )
    return view(record, counts(s, [record.id])[record.id])


def listing(
    s: Session, *, session: str | None = None, limit: int = 20, after: str | None = None
) -> list[Batch]:
    """The newest batches first; `after`: those older than that batch (pagination)."""
    query = select(BatchRecord).order_by(BatchRecord.created_at.desc(), BatchRecord.id.desc())
    if session is not None:
        query = query.where(BatchRecord.session == session)
    if after is not None:
        anchor = s.get(BatchRecord, after)
        if anchor is not None:
            query = query.where(BatchRecord.created_at < anchor.created_at)
    records = list(s.scalars(query.limit(limit)))
    found = counts(s, [r.id for r in records])
    return [view(r, found[r.id]) for r in records]


def active(s: Session) -> list[Batch]:
    """The batches in progress or being cancelled, oldest first."""
    records = list(
        s.scalars(
            select(BatchRecord)
            .where(BatchRecord.status.in_(ACTIVE))
            .order_by(BatchRecord.created_at)
        )
    )
    found = counts(s, [r.id for r in records])
    return [view(r, found[r.id]) for r in records]


def request_cancel(s: Session, batch_id: str, *, session: str | None = None) -> Batch:
    """Cancel a batch: lines not queued yet never run (cancelled now); the feeder cancels
    the queued ones and ends the batch as cancelled. Lines already ended are kept."""
    batch = get(s, batch_id, session=session)
    if batch.status != "in_progress":
        return batch
    now = utcnow()
    s.execute(
        update(BatchRecord)
        .where(BatchRecord.id == batch.id, BatchRecord.status == "in_progress")
        .values(status="cancelling", cancelling_at=now)
    )
    s.execute(
        update(BatchLineRecord)
        .where(BatchLineRecord.batch_id == batch.id, BatchLineRecord.status == "pending")
        .values(status="cancelled", error="the batch was cancelled before this line ran",
                finished_at=now)
    )  # fmt: skip
    in_flight = s.scalar(
        select(BatchLineRecord.id)
        .where(BatchLineRecord.batch_id == batch.id, BatchLineRecord.status == "queued")
        .limit(1)
    )
    if in_flight is None:  # nothing for the feeder to stop: cancelled now
        s.execute(
            update(BatchRecord)
            .where(BatchRecord.id == batch.id, BatchRecord.status == "cancelling")
            .values(status="cancelled", cancelled_at=now)
        )
    return get(s, batch.id)


PAGE = 1000


def ended_page(s: Session, batch_id: str, *, failed: bool, after: int = 0) -> list[BatchLineRecord]:
    """Up to PAGE of the batch's succeeded lines (or, `failed`, the ones that did not
    succeed) past line `after`, in file order."""
    statuses = ("failed", "cancelled", "expired") if failed else ("succeeded",)
    return list(
        s.scalars(
            select(BatchLineRecord)
            .where(
                BatchLineRecord.batch_id == batch_id,
                BatchLineRecord.status.in_(statuses),
                BatchLineRecord.line > after,
            )
            .order_by(BatchLineRecord.line)
            .limit(PAGE)
        )
    )


# -- files (the gateway's /v1/files) -----------------------------------------------------------


def save_file(
    s: Session, *, session: str, filename: str, purpose: str, content: bytes
) -> FileRecord:
    record = FileRecord(
        id=f"file-{uuid.uuid4().hex[:24]}",
        session=session,
        filename=filename[:255],
        purpose=purpose,
        size_bytes=len(content),
        content=content,
        created_at=utcnow(),
    )
    s.add(record)
    s.flush()
    return record


def get_file(s: Session, file_id: str, *, session: str) -> FileRecord:
    record = s.get(FileRecord, file_id)
    if record is None or record.session != session:
        raise UnknownBatch(f"no file '{file_id}'; upload one with POST /v1/files")
    return record


def list_files(s: Session, *, session: str) -> list[FileRecord]:
    from sqlalchemy.orm import defer

    return list(
        s.scalars(
            select(FileRecord)
            .options(defer(FileRecord.content))  # sizes and names, not every upload's bytes
            .where(FileRecord.session == session)
            .order_by(FileRecord.created_at.desc())
        )
    )


# -- for the metrics ---------------------------------------------------------------------------


def status_counts(s: Session) -> list[tuple[str, int]]:
    """(status, batches) for every status some batch has."""
    query = select(BatchRecord.status, func.count()).group_by(BatchRecord.status)
    return [(status, int(n)) for status, n in s.execute(query)]


def active_line_counts(s: Session) -> list[tuple[str, str, int]]:
    """(model, line status, lines) over the batches in progress."""
    in_progress = select(BatchRecord.id).where(BatchRecord.status.in_(ACTIVE))
    query = (
        select(BatchLineRecord.model, BatchLineRecord.status, func.count())
        .where(BatchLineRecord.batch_id.in_(in_progress))
        .group_by(BatchLineRecord.model, BatchLineRecord.status)
    )
    return [(model, status, int(n)) for model, status, n in s.execute(query)]
