"""POST /v1/embeddings: OpenAI's embeddings endpoint, as a farm job on the model's queue.

    body -> farm.openai.embeddings.embedding_fields (400 naming the parameter; nothing queued)
         -> farm.submit: the model serves embeddings? dimensions allowed? quota, queue room
         -> the worker's embedder batches its inputs with other jobs' -> the vectors

An embeddings request is a job like a completion: the same priorities (X-Farm-Priority),
quotas and rate limits (its inputs' tokens), usage row, and cancel: it waits on the event
loop (farm/gateway/follow.py), and a client that goes away cancels its job.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

import farm
from farm.admission.quotas import RateState
from farm.context import get_context
from farm.errors import JobFailed
from farm.gateway import follow, openapi
from farm.gateway.edge import read_body, submitted, until_done_or_gone
from farm.openai import api as openai
from farm.openai.embeddings import EmbeddingsBody, embedding_fields, embeddings_response
from farm.queue import PRIORITIES
from farm.results import Job


def add_routes(app: FastAPI, session_of: Callable[[Request], Awaitable[str]]) -> None:
    @app.post(
        "/v1/embeddings",
        openapi_extra=openapi.request_body(EmbeddingsBody),
        responses=openapi.errors(400, 401, 404, 413, 429, 503),
    )
    async def embeddings(request: Request) -> Any:
        session = await session_of(request)  # the key before the body
        fields = embedding_fields(openai.parse_body(await read_body(request)))
        priority = request.headers.get("x-farm-priority", "normal")
        if priority not in PRIORITIES:
            raise openai.BadBody("X-Farm-Priority must be high, normal or low", "X-Farm-Priority")
        submit = partial(farm.submit, session=session, priority=priority, stream_tokens=False)  # type: ignore[arg-type]
        job: Job = await submitted(submit, **fields)
        request.state.job_id = job.id  # the response's x-request-id, and the access log's job
        ctx = get_context()
        r = follow.async_redis(ctx.result_url, ctx.settings.connect_timeout)
        headers = job.rate.headers() if isinstance(job.rate, RateState) else {}
        try:
            gone = await until_done_or_gone(request, follow.result(job, r))
        except JobFailed as e:  # what the worker found wrong with the input is the caller's
            found = re.match(r"invalid '([a-z_]+)'", str(e))
            if found:
                raise openai.BadBody(str(e), found.group(1)) from e
            raise
        if gone:
            follow.cancel_soon(job)
            return Response(status_code=499)  # nobody reads it: for the access log
        assert job.completion is not None
        body = embeddings_response(job.completion, fields.get("encoding_format", "float"))
        return JSONResponse(body, headers=headers)
