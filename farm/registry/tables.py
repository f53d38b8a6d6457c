"""The registry's tables: models, workers, leases and usage.

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
    """A datetime read back from the registry, in UTC (SQLite hands them back naive)."""
    return dt if dt.tzinfo else dt.replace(tzinfo=UTC)


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
    """A session's limits: tokens per day (prompt and completion) and jobs queued or running.

    What is used and reserved lives in Redis (farm/admission/quotas.py), where a submit
    reserves atomically; the registry keeps the limits and, in usage, what was used."""

    __tablename__ = "quotas"

    session: Mapped[str] = mapped_column(String(128), primary_key=True)
    tokens_per_day: Mapped[int | None] = mapped_column(BigInteger)
    max_queued: Mapped[int | None] = mapped_column(Integer)
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


TERMINAL_STATUSES = ("succeeded", "failed", "cancelled", "expired")
JOB_STATUSES = ("queued", "running", *TERMINAL_STATUSES)
