"""The OpenAI-compatible gateway: FastAPI on top of farm.submit and the job's stream.

    GET  /health                  ok, and whether keys are required (from memory)
    GET  /v1/models               the registered, enabled models
    POST /v1/chat/completions     chat; "stream": true gives server-sent events ending in [DONE]
    POST /v1/completions          plain prompts, the same way
    POST /v1/embeddings           vectors (farm/gateway/embeddings.py)
    /v1/files, /v1/batches        batch jobs (farm/gateway/batches.py)
    /v1/responses                 OpenAI's Responses API (farm/gateway/responses.py)
    GET  /farm/status[/JOB]       `farm status` for an admin key (farm/gateway/operator.py)
    GET  /openapi.json            the routes, their bodies and errors (farm/gateway/openapi.py)

An `Authorization: Bearer KEY` maps to the key's session, so usage is accounted per key.
With no key ever created the gateway needs none (a laptop, on 127.0.0.1); once one was, or
with FARM_GATEWAY_REQUIRE_KEYS, every request needs a live key. Beyond loopback it refuses
every request while no key is live (farm/gateway/keys.py). Priority comes from
`X-Farm-Priority` (high, normal, low; default normal).

A request waiting for its job holds no thread: it reads the job's stream on the event loop
(farm/gateway/follow.py), and a client that goes away, streaming or not, queued or running,
cancels its job at once. Threads do the short, blocking parts: the key check and registry
reads on a pool of their own (so /v1/models never waits behind a burst of submits), and
`farm.submit` on another (farm/gateway/edge.py). The key is checked before the body is
read, and a body over FARM_GATEWAY_MAX_BODY is refused (413) before it is read.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import AsyncIterator, Awaitable, Callable
from functools import partial
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException

import farm
from farm.admission.quotas import RateState
from farm.config import get_settings
from farm.context import get_context
from farm.errors import FarmError, JobFailed, RateLimited
from farm.gateway import embeddings, follow, keys, openapi, operator
from farm.gateway import models as model_routes
from farm.gateway import responses as response_routes
from farm.gateway.access import AccessLog
from farm.gateway.batches import add_routes
from farm.gateway.edge import JobStream, off_loop, read_body, submitted, until_done_or_gone
from farm.gateway.models import ModelList
from farm.openai import api as openai
from farm.openai import shapes
from farm.queue import PRIORITIES
from farm.registry import queries, transaction
from farm.results import Job

log = logging.getLogger(__name__)

# What a request that queues a job can be answered besides its result.
GENERATION_ERRORS = openapi.errors(400, 401, 404, 413, 429, 503)


def create_app(*, exposed: bool = False) -> FastAPI:
    """The gateway's app; `exposed`: it listens beyond loopback, so it refuses every request
    while no API key is live (farm/gateway/keys.py has the whole rule)."""
    app = FastAPI(title="farm", docs_url=None, redoc_url=None)
    app.add_middleware(AccessLog)
    check = keys.KeyCheck(
        lambda: get_context().database_url,
        required=get_settings().gateway_require_keys,
        exposed=exposed,
    )

    def _session(request: Request) -> str:
        """The session of the request's key (farm/gateway/keys.py), or KeyRefused. Blocks:
        sync routes call it on their thread, async ones `session_of`."""
        return _as(request, check.caller_for(_bearer(request)))

    async def session_of(request: Request) -> str:
        """`_session` on the event loop: a key the gateway remembers costs one Redis GET."""
        ctx = get_context()
        try:
            r = follow.async_redis(ctx.result_url, ctx.settings.connect_timeout)
        except FarmError:  # no farm to reach (yet): the registry is read every time
            r = None
        return _as(request, await check.caller(_bearer(request), r, off_loop))

    @app.exception_handler(keys.KeyRefused)
    def _refused(_: Request, e: keys.KeyRefused) -> JSONResponse:
        kind = "server_error" if e.status >= 500 else "invalid_request_error"
        return JSONResponse(
            {"error": {"message": str(e), "type": kind, "param": None, "code": e.code}},
            status_code=e.status,
        )

    @app.exception_handler(RequestValidationError)
    def _bad_query(_: Request, e: RequestValidationError) -> JSONResponse:
        first = e.errors()[0] if e.errors() else {}
        param = str(first.get("loc", ["", "request"])[-1])
        msg = str(first.get("msg")).removeprefix("Value error, ")
        status, body = openai.error(openai.BadBody(f"invalid '{param}': {msg}", param))
        return JSONResponse(body, status_code=status)

    @app.exception_handler(HTTPException)
    def _http_error(request: Request, e: HTTPException) -> JSONResponse:
        headers = e.headers
        allowed = _methods(app, request.url.path) if e.status_code == 405 else []
        named = [method for method in allowed if method != "HEAD"]  # HEAD goes with GET
        if named:
            headers = {**(headers or {}), "Allow": ", ".join(allowed)}
            message = (
                f"{request.url.path} takes {' or '.join(named)} requests, not {request.method}"
            )
        elif e.status_code in (404, 405):
            message = (
                f"no endpoint {request.method} {request.url.path}: farm serves /v1/models, "
                "/v1/chat/completions, /v1/completions, /v1/embeddings, /v1/responses, "
                "/v1/files and /v1/batches"
            )
        else:
            message = str(e.detail)
        body = {
            "error": {
                "message": message,
                "type": "invalid_request_error",
                "param": None,
                "code": "unknown_url" if e.status_code in (404, 405) else None,
            }
        }
        return JSONResponse(body, status_code=e.status_code, headers=headers)

    @app.exception_handler(FarmError)
    def _farm_error(request: Request, e: Exception) -> JSONResponse:
        status, body = openai.error(e, chat=not request.url.path.endswith("/v1/completions"))
        if status >= 500:
            log.warning("request failed: %s", e)
        headers: dict[str, str] = {}
        if isinstance(e, RateLimited):  # the SDKs wait this long before their retry
            headers["retry-after"] = str(max(1, math.ceil(e.retry_after)))
            headers["retry-after-ms"] = str(max(1, math.ceil(e.retry_after * 1000)))
            if isinstance(e.limits, RateState):
                headers.update(e.limits.headers())
        return JSONResponse(body, status_code=status, headers=headers)

    @app.exception_handler(Exception)
    def _bug(request: Request, e: Exception) -> JSONResponse:
        log.error("%s %s failed", request.method, request.url.path, exc_info=e)
        status, body = openai.error(e)  # a 500 in OpenAI's shape, without the internals
        return JSONResponse(body, status_code=status)

    @app.get("/health", responses=openapi.errors())  # answered even while keys are refused
    async def health() -> dict[str, Any]:
        return {"status": "ok", "keys_required": check.keys_required(wait=False)}

    @app.get(
        "/v1/models",
        response_model=None,
        responses={200: {"model": ModelList}, **openapi.errors(401, 503)},
    )
    async def models(request: Request) -> dict[str, Any]:
        await session_of(request)
        return {"object": "list", "data": await off_loop(_models)}

    @app.post(
        "/v1/chat/completions",
        openapi_extra=openapi.request_body(shapes.ChatBody),
        response_model=None,
        responses={200: openapi.streamed("a chat.completion, or its chunks"), **GENERATION_ERRORS},
    )
    async def chat(request: Request) -> Any:
        return await _complete(request, session_of, chat=True)

    @app.post(
        "/v1/completions",
        openapi_extra=openapi.request_body(shapes.CompletionBody),
        response_model=None,
        responses={200: openapi.streamed("a text_completion, or its chunks"), **GENERATION_ERRORS},
    )
    async def completions(request: Request) -> Any:
        return await _complete(request, session_of, chat=False)

    add_routes(app, _session, session_of)
    model_routes.add_routes(app, session_of)
    embeddings.add_routes(app, session_of)
    response_routes.add_routes(app, session_of)
    operator.add_routes(app, session_of)
    openapi.install(app)
    return app


def _methods(app: FastAPI, path: str) -> list[str]:
    """Every method the app's routes take at `path` (Starlette's own Allow header names the
    first matching route's alone: /v1/files, POST and not GET)."""
    return sorted(
        {
            method
            for route in app.router.routes
            if (regex := getattr(route, "path_regex", None)) and regex.match(path)
            for method in getattr(route, "methods", None) or ()
        }
    )


def _bearer(request: Request) -> str:
    """The request's API key (the Bearer value), "" for none."""
    auth = request.headers.get("authorization", "")
    return auth[7:].strip() if auth.lower().startswith("bearer ") else ""


def _as(request: Request, caller: keys.Caller) -> str:
    """Note who the request is and return its session."""
    request.state.session = caller.session  # for the access log
    request.state.admin = caller.admin  # for the operator's routes (farm/gateway/operator.py)
    return caller.session


def _models() -> list[dict[str, Any]]:
    with transaction(get_context().database_url) as s:
        return [
            {
                "id": m.name,
                "object": "model",
                "created": int(m.created_at.timestamp()),
                "owned_by": "farm",
            }
            for m in queries.list_models(s)
            if m.enabled
        ]


async def _complete(
    request: Request, session_of: Callable[[Request], Awaitable[str]], *, chat: bool
) -> Any:
    session = await session_of(request)  # the key before the body
    body = openai.parse_body(await read_body(request))
    fields = openai.request_fields(body, chat=chat)
    priority = request.headers.get("x-farm-priority", "normal")
    if priority not in PRIORITIES:
        raise openai.BadBody("X-Farm-Priority must be high, normal or low", "X-Farm-Priority")
    stream = body.get("stream") is True  # request_fields checked it is a boolean
    submit = partial(farm.submit, session=session, priority=priority, stream_tokens=stream)  # type: ignore[arg-type]
    job: Job = await submitted(submit, **fields)
    request.state.job_id = job.id  # the response's x-request-id, and the access log's job
    ctx = get_context()
    r = follow.async_redis(ctx.result_url, ctx.settings.connect_timeout)
    headers = job.rate.headers() if isinstance(job.rate, RateState) else {}
    if stream:
        include_usage = (body.get("stream_options") or {}).get("include_usage") is True
        prompts = fields.get("prompt")
        choices = fields.get("n", 1) * (len(prompts) if isinstance(prompts, list) else 1)
        events = _events(job, r, fields["model"], chat, include_usage, choices)
        return JobStream(events, job, headers=headers)
    if await until_done_or_gone(request, follow.result(job, r)):
        follow.cancel_soon(job)
        return Response(status_code=499)  # nobody reads it: for the access log
    c = job.completion
    reply = openai.chat_response(c) if chat else openai.completion_response(c)
    return JSONResponse(reply, headers=headers)


class _Replay:
    """A job that starts over on another worker (its first worker was lost) streams its
    text again from the start. What the client already has is not sent twice: the new run's
    text is matched against it and only what goes beyond is sent. A new run whose text
    differs (sampled without a seed) cannot be mended in a stream the client has read:
    the stream ends with an error saying so."""

    def __init__(self) -> None:
        self.sent = ""
        self.again: str | None = None  # while a restarted run repeats: what it must repeat

    def restart(self, worker: str | None = None) -> None:
        self.again = self.sent

    def new_text(self, piece: str) -> str | None:
        """What of `piece` the client has not had; None when the rerun's text differs."""
        if self.again is None:
            self.sent += piece
            return piece
        overlap = min(len(piece), len(self.again))
        if piece[:overlap] != self.again[:overlap]:
            return None
        self.again = self.again[overlap:] or None
        rest = piece[overlap:]
        self.sent += rest
        return rest


RESTARTED_DIFFERENTLY = JobFailed(
    "the worker running this job was lost and the job started over on another, with other "
    "text than was already streamed; retry the request (with a seed a rerun repeats its text)"
)


async def _events(
    job: Job, r: Any, model: str, chat: bool, include_usage: bool, choices: int = 1
) -> AsyncIterator[str]:
    """The job's text as server-sent events, each chunk with its choice's index, read on
    the event loop (farm/gateway/follow.py). JobStream cancels the job when the client goes
    away before the end."""
    replays = {i: _Replay() for i in range(choices)}

    def restart(worker: str | None = None) -> None:
        for replay in replays.values():
            replay.restart(worker)

    job.on_restart = restart
    try:
        if chat:
            for i in range(choices):
                yield openai.chunk(job.id, model, chat=True, role=True, text="", index=i)
        async for piece in follow.events(job, r, tokens=True):
            if piece.tool_call is not None:
                yield openai.chunk(
                    job.id, model, chat=chat, tool_call=piece.tool_call, index=piece.index
                )
                continue
            new = replays.setdefault(piece.index, _Replay()).new_text(piece.text)
            if new is None:  # the rerun cannot be mended: stop it
                follow.cancel_soon(job)
                yield f"data: {json.dumps(openai.error(RESTARTED_DIFFERENTLY, chat=chat)[1])}\n\n"
                return
            if new:
                yield openai.chunk(
                    job.id, model, chat=chat, text=new, index=piece.index, logprobs=piece.logprobs
                )
        if any(x.again for x in replays.values()):  # a rerun ended short of what was sent
            yield f"data: {json.dumps(openai.error(RESTARTED_DIFFERENTLY, chat=chat)[1])}\n\n"
            return
        c = job.completion
        assert c is not None
        for choice in c.all_choices():
            finish = openai.finish_reason(choice)
            yield openai.chunk(job.id, model, chat=chat, finish=finish, index=choice.index)
        if include_usage:
            yield openai.chunk(job.id, model, chat=chat, usage_of=c)
        yield "data: [DONE]\n\n"
    except FarmError as e:  # the status line is sent: the error goes in the stream
        yield f"data: {json.dumps(openai.error(e, chat=chat)[1])}\n\n"
