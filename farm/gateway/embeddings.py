"""POST /v1/embeddings: OpenAI's embeddings endpoint, as a farm job on the model's queue.

    body -> openai_embeddings.embedding_fields (400 naming the parameter; nothing queued)
         -> farm.submit: the model serves embeddings? dimensions allowed? quota, queue room
         -> the worker's embedder batches its inputs with other jobs' -> the vectors

An embeddings request is a job like a completion: the same priorities (X-Farm-Priority),
quotas (its inputs' tokens), usage row and cancel (a client that goes away cancels it).
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, Request
from starlette.concurrency import run_in_threadpool

import farm
from farm import openai_api as openai
from farm.errors import JobFailed
from farm.openai_embeddings import embedding_fields, embeddings_response
from farm.queue import PRIORITIES


def add_routes(app: FastAPI, session_of: Callable[[Request], str]) -> None:
    @app.post("/v1/embeddings")
    async def embeddings(request: Request) -> Any:
        body = openai.parse_body(await request.body())
        job: list[Any] = []
        try:
            return await run_in_threadpool(_embed, request, session_of, body, job)
        except BaseException:
            if job:  # the client went away (or the wait failed): the job need not run
                threading.Thread(target=job[0].cancel, daemon=True).start()
            raise


def _embed(
    request: Request, session_of: Callable[[Request], str], body: Any, started: list[Any]
) -> dict[str, Any]:
    session = session_of(request)
    fields = embedding_fields(body)
    priority = request.headers.get("x-farm-priority", "normal")
    if priority not in PRIORITIES:
        raise openai.BadBody("X-Farm-Priority must be high, normal or low", "X-Farm-Priority")
    job = farm.submit(session=session, priority=priority, stream_tokens=False, **fields)  # type: ignore[arg-type]
    started.append(job)
    request.state.job_id = job.id  # the response's x-request-id, and the access log's job
    try:
        c = job.result()
    except JobFailed as e:  # what the worker found wrong with the input is the caller's
        found = re.match(r"invalid '([a-z_]+)'", str(e))
        if found:
            raise openai.BadBody(str(e), found.group(1)) from e
        raise
    started.clear()
    return embeddings_response(c, fields.get("encoding_format", "float"))
