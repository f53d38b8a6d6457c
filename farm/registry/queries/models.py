"""Queries on the models table: register, list, find and remove the LLMs farm serves. Every
function takes the caller's session; none commits."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from farm.errors import ModelExists, UnknownModel
from farm.registry.tables import (
    ModelRecord,
)


def add_model(
    s: Session,
    *,
    name: str,
    path: str,
    n_ctx: int = 4096,
    n_gpu_layers: int = -1,
    chat_format: str | None = None,
    defaults: dict[str, Any] | None = None,
    embedding: bool = False,
    pooling: str | None = None,
    normalize: bool = True,
    dimensions: list[int] | None = None,
) -> ModelRecord:
    if s.scalar(select(ModelRecord).where(ModelRecord.name == name)) is not None:
        raise ModelExists(
            f"a model named '{name}' is already registered; remove it first with "
            f"`farm models remove {name}` or pick another name"
        )
    record = ModelRecord(
        name=name,
        path=path,
        n_ctx=n_ctx,
        n_gpu_layers=n_gpu_layers,
        chat_format=chat_format,
        defaults=defaults or {},
        enabled=True,
        embedding=embedding,
        pooling=pooling,
        normalize=normalize,
        dimensions=dimensions,
    )
    s.add(record)
    s.flush()
    return record


def list_models(s: Session) -> list[ModelRecord]:
    return list(s.scalars(select(ModelRecord).order_by(ModelRecord.name)))


def get_model(s: Session, name: str) -> ModelRecord:
    """The enabled model called `name`, or UnknownModel listing the known ones."""
    record = s.scalar(select(ModelRecord).where(ModelRecord.name == name))
    if record is None or not record.enabled:
        known = ", ".join(m.name for m in list_models(s) if m.enabled) or "none yet"
        raise UnknownModel(
            f"unknown model '{name}'; known: {known}; add one with `farm models add NAME PATH.gguf`"
        )
    return record


def remove_model(s: Session, name: str) -> None:
    record = get_model(s, name)
    s.delete(record)
