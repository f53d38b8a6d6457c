"""The operator's routes: what `farm status` shows, for an admin key, so that an operator
reads a remote farm through its gateway (`farm status --gateway URL`) with no registry or
broker URL on their machine.

    GET /farm/status         models, workers, leases, queue depths, sessions, batches
    GET /farm/status/{job}   one job's state and place in its queue

The same JSON as `farm status --json`; a key that is not an admin key gets 403.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import FastAPI, Request

from farm.gateway import openapi
from farm.gateway.edge import off_loop
from farm.gateway.keys import KeyRefused
from farm.request import Text
from farm.status import fleet_status, job_status


async def _admin(request: Request, session_of: Callable[[Request], Awaitable[str]]) -> None:
    await session_of(request)
    if not getattr(request.state, "admin", False):
        raise KeyRefused(
            403,
            "the farm's status is for admin keys, and this request has none: ask the "
            "farm's operator for one (`farm keys create --session NAME --admin`)",
            "not_admin",
        )


def add_routes(app: FastAPI, session_of: Callable[[Request], Awaitable[str]]) -> None:
    @app.get("/farm/status", response_model=None, responses=openapi.errors(401, 403, 503))
    async def status(request: Request) -> dict[str, Any]:
        await _admin(request, session_of)
        return await off_loop(fleet_status)

    @app.get(
        "/farm/status/{job_id}", response_model=None, responses=openapi.errors(401, 403, 404, 503)
    )
    async def job(request: Request, job_id: Text) -> dict[str, Any]:
        await _admin(request, session_of)
        return await off_loop(job_status, job_id)
