"""Request ids and the access log of the gateway, as ASGI middleware.

Every response carries `x-request-id`: the id of the job the request made, where it made
one, else the id the caller sent in its own `x-request-id`, else a new one. Every request
leaves one line on the `farm.access` logger when its response has been sent (or the
client went away): method, path, status, duration, session and job; never the prompt or
the text, which are user data.

    POST /v1/chat/completions 200 812.4ms session=alice job=3f6c...
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

log = logging.getLogger("farm.access")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
ASGIApp = Callable[[Scope, Callable[[], Awaitable[Message]], Callable[[Message], Awaitable[None]]], Awaitable[None]]  # fmt: skip

# A caller's id is echoed only when it is short plain text: it goes into headers and logs.
CALLER_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


class AccessLog:
    """Wraps the app: `request.state.session` and `request.state.job_id`, set by the
    routes, name the session and the job in the header and the log line."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(
        self,
        scope: Scope,
        receive: Callable[[], Awaitable[Message]],
        send: Callable[[Message], Awaitable[None]],
    ) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        state = scope.setdefault("state", {})
        sent = dict(scope.get("headers") or []).get(b"x-request-id", b"").decode("latin-1")
        request_id = sent if CALLER_ID.match(sent) else uuid.uuid4().hex
        status = [0]

        async def sending(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                shown = state.get("job_id") or request_id
                headers = [*message.get("headers", []), (b"x-request-id", shown.encode())]
                message = {**message, "headers": headers}
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            log.info(
                "%s %s %s %.1fms session=%s job=%s",
                scope.get("method", "-"),
                scope.get("path", "-"),
                status[0] or "-",  # none sent: the client went away first
                (time.perf_counter() - started) * 1000,
                state.get("session", "-"),
                state.get("job_id", "-"),
            )
