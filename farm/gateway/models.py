"""GET /v1/models/{id}: one model as OpenAI's model object (404 naming `model` for one
that is not registered or is disabled)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, Literal

from fastapi import FastAPI, Request
from pydantic import BaseModel

from farm.context import get_context
from farm.gateway import openapi
from farm.gateway.edge import off_loop
from farm.registry import queries, transaction


class ModelObject(BaseModel):
    """OpenAI's model object, as `model_object` makes it (documented in /openapi.json)."""

    id: str
    object: Literal["model"]
    created: int
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelObject]


def model_object(name: str, created: float) -> dict[str, Any]:
    """OpenAI's model object for a registered model."""
    return {"id": name, "object": "model", "created": int(created), "owned_by": "farm"}


def _model(name: str) -> dict[str, Any]:
    with transaction(get_context().database_url) as s:
        record = queries.get_model(s, name)  # UnknownModel: 404, param 'model'
        return model_object(record.name, record.created_at.timestamp())


def add_routes(app: FastAPI, session_of: Callable[[Request], Awaitable[str]]) -> None:
    """Register GET /v1/models/{model_id} on the gateway's app."""

    @app.get(
        "/v1/models/{model_id:path}",
        response_model=None,
        responses={200: {"model": ModelObject}, **openapi.errors(401, 404, 503)},
    )
    async def model(model_id: str, request: Request) -> dict[str, Any]:
        await session_of(request)
        return await off_loop(_model, model_id)
