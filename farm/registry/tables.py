"""The registry's tables: models, workers, leases, usage, quotas, API keys, batches, and
stored responses (the Responses API).

Named tables and records, not "models": in farm a model is an LLM.
Every schema change is an Alembic migration in `migrations/versions`.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, ClassVar

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    false,
    true,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


def utcnow() -> datetime:
    return datetime.now(UTC)


def as_utc(dt: datetime) -> datetime:
    """A datetime read back from the registry, in UTC (SQLite hands them back naive,
    PostgreSQL in its session's time zone)."""
    return dt.astimezone(UTC) if dt.tzinfo else dt.replace(tzinfo=UTC)


class Base(DeclarativeBase):
    # Stable constraint names, so migrations can refer to them on every database.
    metadata = MetaData(
        naming_convention={
            "ix": "ix_%(column_0_label)s",
            "uq": "uq_%(table_name)s_%(column_0_name)s",
            "ck": "ck_%(table_name)s_%(constraint_name)s",
            "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
            "pk": "pk_%(table_name)s",
        }
    )
    type_annotation_map: ClassVar[dict[Any, Any]] = {
        datetime: DateTime(timezone=True),
        dict[str, Any]: JSON,
    }


class ModelRecord(Base):
    """An LLM the farm can serve: a GGUF file and how to load it."""

    __tablename__ = "models"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    path: Mapped[str] = mapped_column(Text)
    n_ctx: Mapped[int] = mapped_column(Integer, default=4096)
    n_gpu_layers: Mapped[int] = mapped_column(Integer, default=-1)
    chat_format: Mapped[str | None] = mapped_column(String(64))
    defaults: Mapped[dict[str, Any]] = mapped_column(default=dict)
    enabled: Mapped[bool] = mapped_column(default=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    # Embeddings (POST /v1/embeddings): served when `embedding`; pooled as `pooling` (mean,
    # cls, last; null: the GGUF's own, else mean); unit vectors when `normalize`;
    # `dimensions`: the shorter sizes a request may ask for (null: none).
    embedding: Mapped[bool] = mapped_column(default=False, server_default=false())
    pooling: Mapped[str | None] = mapped_column(String(8))
    normalize: Mapped[bool] = mapped_column(default=True, server_default=true())
    dimensions: Mapped[list[int] | None] = mapped_column(JSON)


class WorkerRecord(Base):
    """One worker process, from registration until it stops or is lost."""

    __tablename__ = "workers"

    id: Mapped[str] = mapped_column(String(255), primary_key=True)
    host: Mapped[str] = mapped_column(String(255))
    pid: Mapped[int] = mapped_column(Integer)
    device: Mapped[str] = mapped_column(String(64))
    state: Mapped[str] = mapped_column(String(16))  # starting, ready, busy, stopped, lost
    slots: Mapped[int] = mapped_column(Integer, default=1, server_default="1")
    threads: Mapped[int] = mapped_column(Integer, default=1, server_default="1")
    tokens_per_s: Mapped[float | None] = mapped_column(Float)
    started_at: Mapped[datetime] = mapped_column(default=utcnow)
    heartbeat_at: Mapped[datetime] = mapped_column(default=utcnow)
    versions: Mapped[dict[str, Any]] = mapped_column(default=dict)


class LeaseRecord(Base):
    """A worker holds a loaded model on a device until `expires_at`; heartbeats renew it."""

    __tablename__ = "leases"
    __table_args__ = (UniqueConstraint("worker_id", "model", name="uq_leases_worker_model"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    worker_id: Mapped[str] = mapped_column(ForeignKey("workers.id", ondelete="CASCADE"))
    model: Mapped[str] = mapped_column(String(64), index=True)
    device: Mapped[str] = mapped_column(String(64))
    # False: the worker may serve the model but loads it on the first job that needs it.
    loaded: Mapped[bool] = mapped_column(default=True, server_default=true())
    pinned: Mapped[bool] = mapped_column(default=False, server_default=false())
    size_bytes: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    acquired_at: Mapped[datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[datetime] = mapped_column()


class UsageRecord(Base):
    """One row per job: created when it is queued, completed once when it ends.

    The rows marked running with a worker's id are the jobs that worker holds."""

    __tablename__ = "usage"
    __table_args__ = (
        Index("ix_usage_worker_id_status", "worker_id", "status"),
        Index("ix_usage_status_submitted_at", "status", "submitted_at"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    job_id: Mapped[str] = mapped_column(String(64), unique=True)
    session: Mapped[str] = mapped_column(String(128), index=True)
    model: Mapped[str] = mapped_column(String(64), index=True)
    priority: Mapped[str] = mapped_column(String(8))
    # queued, running, succeeded, failed, cancelled, expired
    status: Mapped[str] = mapped_column(String(16))
    worker_id: Mapped[str | None] = mapped_column(String(255))
    prompt_tokens: Mapped[int] = mapped_column(Integer, default=0)
    # Of the prompt tokens, those found in the worker's prompt cache (not evaluated again).
    cached_tokens: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    completion_tokens: Mapped[int] = mapped_column(Integer, default=0)
    finish_reason: Mapped[str | None] = mapped_column(String(16))
    error: Mapped[str | None] = mapped_column(Text)
    queue_wait_ms: Mapped[float | None] = mapped_column(Float)
    ttft_ms: Mapped[float | None] = mapped_column(Float)
    generation_ms: Mapped[float | None] = mapped_column(Float)
    submitted_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column()
    finished_at: Mapped[datetime | None] = mapped_column()


class QuotaRecord(Base):
    """A session's limits: tokens per day (prompt and completion), jobs queued or running,
    and requests and tokens per minute (a rate limit, per API key's session); and its
    weight in fair share (farm/fair/: twice the weight, twice the share when backlogged).

    What is used and reserved lives in Redis (farm/admission/quotas.py), where a submit
    reserves atomically; the registry keeps the limits and, in usage, what was used."""

    __tablename__ = "quotas"

    session: Mapped[str] = mapped_column(String(128), primary_key=True)
    tokens_per_day: Mapped[int | None] = mapped_column(BigInteger)
    max_queued: Mapped[int | None] = mapped_column(Integer)
    requests_per_minute: Mapped[int | None] = mapped_column(Integer)
    tokens_per_minute: Mapped[int | None] = mapped_column(BigInteger)
    weight: Mapped[float | None] = mapped_column(Float)  # None: 1
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)


class ApiKeyRecord(Base):
    """A key for the OpenAI-compatible gateway: only its SHA-256 is kept; it maps to a
    session, so its usage is accounted there."""

    __tablename__ = "api_keys"

    id: Mapped[int] = mapped_column(primary_key=True)
    prefix: Mapped[str] = mapped_column(String(16))  # shown in `farm keys list`
    digest: Mapped[str] = mapped_column(String(64), unique=True)
    session: Mapped[str] = mapped_column(String(128))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column()
    # An operator's key: it may also read the farm's status (/farm/status) through the gateway.
    admin: Mapped[bool] = mapped_column(default=False, server_default=false())


class FileRecord(Base):
    """A file uploaded through the gateway's /v1/files (a batch's input lines)."""

    __tablename__ = "files"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    session: Mapped[str] = mapped_column(String(128), index=True)
    filename: Mapped[str] = mapped_column(String(255))
    purpose: Mapped[str] = mapped_column(String(32))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    content: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class BatchRecord(Base):
    """A batch: lines queued by the feeder a few at a time (farm/batches/).

    Status: in_progress, then finalizing and completed; or cancelling and cancelled; or
    expired (its completion window ended first); failed when it could not start.
    `name` identifies it for idempotent submits: the caller's name or the file's hash."""

    __tablename__ = "batches"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    session: Mapped[str] = mapped_column(String(128), index=True)
    priority: Mapped[str] = mapped_column(String(8))
    endpoint: Mapped[str] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(16), index=True)
    total: Mapped[int] = mapped_column(Integer)
    content_hash: Mapped[str] = mapped_column(String(64))
    input_file_id: Mapped[str | None] = mapped_column(String(64))
    completion_window_s: Mapped[int] = mapped_column(Integer)
    meta: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[datetime] = mapped_column()
    finalizing_at: Mapped[datetime | None] = mapped_column()
    completed_at: Mapped[datetime | None] = mapped_column()
    cancelling_at: Mapped[datetime | None] = mapped_column()
    cancelled_at: Mapped[datetime | None] = mapped_column()
    expired_at: Mapped[datetime | None] = mapped_column()
    failed_at: Mapped[datetime | None] = mapped_column()


class BatchLineRecord(Base):
    """One line of a batch: its request, and once it ends, its result or error.

    Status: pending (not queued yet), queued (its job is queued or running: `job_id`),
    then succeeded, failed, cancelled or expired. The worker writes the outcome once, on
    the job's id, in the transaction that completes the job's usage row."""

    __tablename__ = "batch_lines"
    __table_args__ = (
        UniqueConstraint("batch_id", "line", name="uq_batch_lines_batch_id_line"),
        Index("ix_batch_lines_batch_id_status", "batch_id", "status"),
        Index("ix_batch_lines_status_model", "status", "model"),
    )

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    batch_id: Mapped[str] = mapped_column(ForeignKey("batches.id", ondelete="CASCADE"))
    line: Mapped[int] = mapped_column(Integer)  # 1-based, in the input file
    custom_id: Mapped[str] = mapped_column(String(512))
    model: Mapped[str] = mapped_column(String(64))
    chat: Mapped[bool] = mapped_column()
    request: Mapped[dict[str, Any]] = mapped_column()  # the Request's fields, on the wire
    status: Mapped[str] = mapped_column(String(16))
    job_id: Mapped[str | None] = mapped_column(String(64), unique=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    result: Mapped[dict[str, Any] | None] = mapped_column()  # the Completion
    error: Mapped[str | None] = mapped_column(Text)
    finished_at: Mapped[datetime | None] = mapped_column()


class ResponseRecord(Base):
    """A stored response of the gateway's /v1/responses, readable only by its session: the
    response as returned, and the conversation it ends (the input items, with those of the
    responses before it, then its output items), so `previous_response_id` can continue it."""

    __tablename__ = "responses"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    session: Mapped[str] = mapped_column(String(128), index=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    conversation: Mapped[list[Any]] = mapped_column(JSON)
    response: Mapped[dict[str, Any]] = mapped_column()


TERMINAL_STATUSES = ("succeeded", "failed", "cancelled", "expired")
# A worker in one of these states holds (or is about to hold) its id and device.
ACTIVE_WORKER_STATES = ("starting", "ready", "busy")
JOB_STATUSES = ("queued", "running", *TERMINAL_STATUSES)
