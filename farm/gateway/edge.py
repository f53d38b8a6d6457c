"""The edge of a gateway request, where HTTP meets farm: the body read within its limit,
blocking calls kept off the event loop, and waits raced against the client going away (a
job whose client left is cancelled, streaming or not, queued or running)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any, TypeVar

from fastapi import Request
from fastapi.responses import StreamingResponse

from farm.config import get_settings
from farm.context import get_context
from farm.gateway import follow
from farm.openai import api as openai
from farm.results import Job

T = TypeVar("T")

FLUSH_BEFORE_HEADERS_S = 2.0

# Key checks and registry reads: short, and never queued behind submits.
READS = ThreadPoolExecutor(max_workers=8, thread_name_prefix="gateway-reads")


# Submits, on a few threads of their own: on Starlette's 40, a burst of requests kept 40
# threads contending with the event loop for the GIL.
SUBMITS = ThreadPoolExecutor(max_workers=8, thread_name_prefix="gateway-submits")


async def off_loop(fn: Callable[..., T], *args: Any) -> T:
    """`fn(*args)` on the READS pool, awaited."""
    return await asyncio.get_running_loop().run_in_executor(READS, partial(fn, *args))


async def submitted(submit: Callable[..., T], **fields: Any) -> T:
    """`submit(**fields)` (farm.submit) on the SUBMITS pool, awaited."""
    return await asyncio.get_running_loop().run_in_executor(SUBMITS, partial(submit, **fields))


async def read_body(request: Request, limit: int | None = None) -> bytes:
    """The request's body, refused (413) as soon as it is known to be over `limit` bytes
    (FARM_GATEWAY_MAX_BODY): from its Content-Length before anything is read, else while
    it arrives."""
    limit = limit or get_settings().gateway_max_body
    too_large = openai.BodyTooLarge(
        f"the request body is over {limit:,} bytes (FARM_GATEWAY_MAX_BODY): send less, "
        "or put long work in a batch file"
    )
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


async def _disconnected(receive: Callable[[], Awaitable[Any]]) -> None:
    """Returns when the client has gone away (after the body was read, the server's next
    message is http.disconnect, sent when the connection closes)."""
    while (await receive())["type"] != "http.disconnect":
        pass


async def until_done_or_gone(request: Request, work: Awaitable[Any]) -> bool:
    """Await `work`; True, with `work` cancelled, if the client went away first."""
    waiting = asyncio.ensure_future(work)
    watching = asyncio.ensure_future(_disconnected(request.receive))
    try:
        await asyncio.wait((waiting, watching), return_when=asyncio.FIRST_COMPLETED)
    finally:
        watching.cancel()
        if not waiting.done():
            waiting.cancel()
    if waiting.done() and not waiting.cancelled():
        waiting.result()  # the job's error, if it failed
        return False
    return True


class JobStream(StreamingResponse):
    """Server-sent events of a job's text. The job is cancelled unless the stream was sent
    to its end: when the client goes away (watched from the start, so a job still queued is
    cancelled too), or the gateway stops."""

    def __init__(
        self, content: AsyncIterator[str], job: Job, headers: dict[str, str] | None = None
    ):
        super().__init__(content, media_type="text/event-stream", headers=headers)
        self.content = content
        self.job = job

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        finished = False

        async def stream() -> None:
            # The headers hand the job's id (x-request-id) to the client, which may look it
            # up at once from another process (`farm status ID`): its registry row is
            # written first, waited for on the loop's own executor (not READS, which the
            # key checks need), and for 2 s at most.
            flush = partial(get_context().flush_rows, FLUSH_BEFORE_HEADERS_S)
            await asyncio.get_running_loop().run_in_executor(None, flush)
            await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
            async for event in self.content:
                await send(
                    {"type": "http.response.body", "body": event.encode(), "more_body": True}
                )
            await send({"type": "http.response.body", "body": b"", "more_body": False})

        sending = asyncio.ensure_future(stream())
        watching = asyncio.ensure_future(_disconnected(receive))
        try:
            await asyncio.wait((sending, watching), return_when=asyncio.FIRST_COMPLETED)
            if sending.done() and not sending.cancelled():
                sending.result()
                finished = True
        finally:
            watching.cancel()
            sending.cancel()
            if not finished:
                follow.cancel_soon(self.job)
