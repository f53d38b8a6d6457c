"""A model as a worker loads it: what the registry records for it (ModelSpec)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class ModelSpec:
    """How to load one model: what the registry records for it."""

    name: str
    path: str
    n_ctx: int = 4096
    n_gpu_layers: int = -1
    chat_format: str | None = None
    defaults: dict[str, Any] = field(default_factory=dict)
