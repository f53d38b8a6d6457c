"""OpenAI's Responses API on farm's chat jobs (shapes in farm/openai/responses.py).

    POST   /v1/responses         input, instructions, tools, previous_response_id, store, ...;
                                 "stream": true gives the Responses event stream
    GET    /v1/responses/{id}    a stored response
    DELETE /v1/responses/{id}

A response is one chat job: its conversation (the stored conversation of
`previous_response_id`, then the new input) becomes the chat's messages, so a continued
conversation has the same prompt prefix as the turn before and finds it in a slot's cache.
Stored responses (`store`, true by default) belong to the key's session; another session's
id is a 404. The request is checked whole before its job is queued, as chat's is.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import contextmanager
from functools import partial
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

import farm
from farm.admission.quotas import RateState
from farm.context import get_context
from farm.errors import FarmError, InvalidRequest, JobFailed
from farm.gateway import follow, openapi
from farm.gateway.batches import Id
from farm.gateway.edge import JobStream, off_loop, read_body, submitted, until_done_or_gone
from farm.openai import api as openai
from farm.openai import responses as shapes
from farm.queue import PRIORITIES
from farm.registry import transaction
from farm.registry.queries import responses as stored
from farm.results import Job


def add_routes(app: FastAPI, session_of: Callable[[Request], Awaitable[str]]) -> None:
    """The routes; `session_of` checks the request's key from the event loop."""

    @app.post(
        "/v1/responses",
        openapi_extra=openapi.request_body(shapes.ResponsesBody),
        response_model=None,
        responses={
            200: openapi.streamed("a response object, or the Responses event stream"),
            **openapi.errors(400, 401, 404, 413, 429, 503),
        },
    )
    async def create(request: Request) -> Any:
        session = await session_of(request)  # the key before the body
        body = shapes.check_body(openai.parse_body(await read_body(request)))
        conversation: list[dict[str, Any]] = []
        previous = body.get("previous_response_id")
        if previous is not None:
            previous = shapes.valid_id(previous)
            found = await off_loop(_conversation, previous, session)
            if found is None:
                return _not_found(previous, "previous_response_id")
            conversation = found
        conversation += shapes.input_items(body["input"])
        with _renamed():
            fields = openai.request_fields(shapes.chat_body(body, conversation), chat=True)
        priority = request.headers.get("x-farm-priority", "normal")
        if priority not in PRIORITIES:
            raise openai.BadBody("X-Farm-Priority must be high, normal or low", "X-Farm-Priority")
        stream = body.get("stream") is True
        submit = partial(farm.submit, session=session, priority=priority, stream_tokens=stream)  # type: ignore[arg-type]
        with _renamed():
            job: Job = await submitted(submit, **fields)
        request.state.job_id = job.id
        turn = _Turn(f"resp_{uuid.uuid4().hex}", body, session, conversation)
        ctx = get_context()
        r = follow.async_redis(ctx.result_url, ctx.settings.connect_timeout)
        headers = job.rate.headers() if isinstance(job.rate, RateState) else {}
        if stream:
            return JobStream(_events(job, r, turn), job, headers=headers)
        try:
            if await until_done_or_gone(request, follow.result(job, r)):
                follow.cancel_soon(job)
                return Response(status_code=499)  # nobody reads it: for the access log
        except FarmError as e:  # a prompt too long is in 'input' here, not 'messages'
            status, err = openai.error(e)
            err["error"]["param"] = shapes.renamed(err["error"]["param"])
            return JSONResponse(err, status_code=status, headers=headers)
        reply = await off_loop(turn.finish, job.completion)
        return JSONResponse(reply, headers=headers)

    @app.get("/v1/responses/{response_id}", responses=openapi.errors(400, 401, 404, 503))
    async def retrieve(response_id: Id, request: Request) -> Any:
        session = await session_of(request)
        found = await off_loop(_stored, response_id, session)
        return found if found is not None else _not_found(response_id, None)

    @app.delete("/v1/responses/{response_id}", responses=openapi.errors(400, 401, 404, 503))
    async def remove(response_id: Id, request: Request) -> Any:
        session = await session_of(request)
        if not await off_loop(_remove, response_id, session):
            return _not_found(response_id, None)
        return {"id": response_id, "object": "response.deleted", "deleted": True}


class _Turn:
    """One response being made: its id, its body, and the conversation it continues."""

    def __init__(self, rid: str, body: dict[str, Any], session: str, items: list[Any]):
        self.id, self.body, self.session, self.items = rid, body, session, items
        self.created_at = int(time.time())

    def start(self) -> dict[str, Any]:
        return shapes.response_object(self.id, self.body, created_at=self.created_at)

    def finish(self, c: Any) -> dict[str, Any]:
        """The finished response object, stored (unless `store` is false). Blocks."""
        reply = shapes.response_object(self.id, self.body, created_at=self.created_at, c=c)
        if self.body.get("store", True):
            conversation = self.items + shapes.as_input(reply["output"])
            with transaction(get_context().database_url) as s:
                stored.add(
                    s, id=self.id, session=self.session, conversation=conversation, response=reply
                )
        return reply


@contextmanager
def _renamed() -> Iterator[None]:
    """A chat body's errors with the params named as the Responses body names them."""
    try:
        yield
    except InvalidRequest as e:
        if type(e) is not InvalidRequest and not isinstance(e, openai.BadBody):
            raise
        err = openai.error(e)[1]
        param = shapes.renamed(err["error"]["param"])
        message = err["error"]["message"]
        for chat_name, name in shapes.RENAMES.items():
            message = message.replace(f"'{chat_name}", f"'{name}")
        raise openai.BadBody(message, param) from e


def _not_found(response_id: str, param: str | None) -> JSONResponse:
    message = f"no response with id '{response_id[:80]}' (stored responses are per key's session)"
    body = {"error": {"message": message, "type": "invalid_request_error", "param": param,
                      "code": "not_found"}}  # fmt: skip
    return JSONResponse(body, status_code=404)


def _conversation(response_id: str, session: str) -> list[Any] | None:
    with transaction(get_context().database_url) as s:
        record = stored.get(s, response_id, session)
        return list(record.conversation) if record is not None else None


def _stored(response_id: str, session: str) -> dict[str, Any] | None:
    with transaction(get_context().database_url) as s:
        record = stored.get(s, response_id, session)
        return dict(record.response) if record is not None else None


def _remove(response_id: str, session: str) -> bool:
    with transaction(get_context().database_url) as s:
        return stored.remove(s, response_id, session)


class _Output:
    """The output items streamed so far: which one is open, and its text or arguments."""

    def __init__(self, job_id: str, emit: shapes.StreamEvents):
        self.job_id, self.emit = job_id, emit
        self.index = -1
        self.open: str | None = None  # "message" or "call"
        self.text = ""
        self.calls = -1
        self.call: tuple[str, str] = ("", "")

    def close(self) -> list[str]:
        where = {"output_index": self.index}
        if self.open == "message":
            mid = shapes.message_id(self.job_id)
            part = {"item_id": mid, "content_index": 0, **where}
            out = [
                self.emit("response.output_text.done", text=self.text, logprobs=[], **part),
                self.emit("response.content_part.done", part=shapes.text_part(self.text), **part),
                self.emit(
                    "response.output_item.done",
                    item=shapes.message_item(self.job_id, self.text, "completed"),
                    **where,
                ),
            ]
        elif self.open == "call":
            item = shapes.call_item(self.job_id, self.calls, *self.call, self.text)
            out = [
                self.emit(
                    "response.function_call_arguments.done",
                    item_id=item["id"],
                    arguments=self.text,
                    name=item["name"],
                    **where,
                ),
                self.emit("response.output_item.done", item=item, **where),
            ]
        else:
            out = []
        self.open = None
        return out

    def text_piece(self, text: str) -> list[str]:
        out = []
        if self.open != "message":
            out = self.close()
            self.index, self.open, self.text = self.index + 1, "message", ""
            mid = shapes.message_id(self.job_id)
            item = shapes.message_item(self.job_id, None, "in_progress")
            out.append(self.emit("response.output_item.added", output_index=self.index, item=item))
            out.append(
                self.emit(
                    "response.content_part.added",
                    item_id=mid,
                    output_index=self.index,
                    content_index=0,
                    part=shapes.text_part(""),
                )
            )
        if text:
            self.text += text
            out.append(
                self.emit(
                    "response.output_text.delta",
                    item_id=shapes.message_id(self.job_id),
                    output_index=self.index,
                    content_index=0,
                    delta=text,
                    logprobs=[],
                )
            )
        return out

    def call_piece(self, d: Any) -> list[str]:
        out = []
        if d.id is not None:  # a new call begins
            out = self.close()
            self.index, self.open, self.text = self.index + 1, "call", ""
            self.calls += 1
            self.call = (d.id, d.name or "")
            item = shapes.call_item(self.job_id, self.calls, *self.call, "", "in_progress")
            out.append(self.emit("response.output_item.added", output_index=self.index, item=item))
        if d.arguments:
            self.text += d.arguments
            out.append(
                self.emit(
                    "response.function_call_arguments.delta",
                    item_id=shapes.call_item_id(self.job_id, self.calls),
                    output_index=self.index,
                    delta=d.arguments,
                )
            )
        return out


RESTARTED = JobFailed(
    "the worker running this response was lost and its job started over on another after "
    "part of it was streamed; retry the request"
)


async def _events(job: Job, r: Any, turn: _Turn) -> AsyncIterator[str]:
    """The Responses event stream of a job: created, in progress, its items as they stream,
    then completed (or incomplete, when it ran out of tokens). JobStream cancels the job
    when the client goes away before the end."""
    emit = shapes.StreamEvents()
    yield emit("response.created", response=turn.start())
    yield emit("response.in_progress", response=turn.start())
    output = _Output(job.id, emit)
    restarted: list[str | None] = []
    job.on_restart = restarted.append
    try:
        async for piece in follow.events(job, r, tokens=True):
            if restarted and output.index >= 0:
                # The job started over on another worker: its items would stream again.
                follow.cancel_soon(job)
                raise RESTARTED
            if piece.index != 0:
                continue
            events = (
                output.call_piece(piece.tool_call)
                if piece.tool_call is not None
                else output.text_piece(piece.text)
                if piece.text
                else []
            )
            for event in events:
                yield event
        if output.index < 0:  # nothing at all: an empty message, as the response has
            for event in output.text_piece(""):
                yield event
        for event in output.close():
            yield event
        reply = await off_loop(turn.finish, job.completion)
        final = "response.completed" if reply["status"] == "completed" else "response.incomplete"
        yield emit(final, response=reply)
    except FarmError as e:  # the status line is sent: the error goes in the stream
        err = openai.error(e)[1]["error"]
        yield emit("error", code=err["code"], message=err["message"], param=err["param"])
