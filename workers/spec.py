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
    # Embeddings: served when `embedding`, pooled as `pooling` (mean, cls, last; None: the
    # GGUF's own, else mean), unit length when `normalize`; `dimensions`: the shorter
    # sizes a request may ask for (Matryoshka-trained models), None for none.
    embedding: bool = False
    pooling: str | None = None
    normalize: bool = True
    dimensions: tuple[int, ...] | None = None
