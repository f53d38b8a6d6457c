"""The gateway's HTTP server: uvicorn on httptools (llhttp, in C), with what farm adds at
the connection level.

- A request's headers must arrive within FARM_GATEWAY_HEADER_TIMEOUT seconds of its first
  byte (of the connection, for the first request): a client that trickles them (slow-loris)
  gets 408 and its connection is closed, instead of holding it forever.
- A request's head (its line and headers) is at most MAX_HEADER_BYTES: llhttp sets no
  limit of its own.
- What uvicorn answers itself before the app sees a request (a request that is not HTTP,
  a head over the limit) is in OpenAI's JSON error shape, as every other error of the
  gateway, not plain text.

httptools, not h11: h11 parses and writes HTTP in Python, about a fifth of the event loop's
work for a one-token chat, on the loop that every waiting request and /health share
(bench/README.md, "The gateway's HTTP parser").
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from farm.config import get_settings

MAX_HEADER_BYTES = 64 * 1024
LINGER_S = 2.0  # how long a connection answered with an error drains before closing


class HeadTooLarge(Exception):
    """Raised from the parser's callback: a request's head over MAX_HEADER_BYTES."""


class GatewayProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a header timeout, a limit on the head and JSON
    errors (see the module)."""

    header_timeout: float = 10.0
    _header_timer: asyncio.TimerHandle | None = None
    _answered = False  # an error was sent; the connection lingers, then closes
    _in_message = False  # a request has begun to arrive and has not arrived whole
    _head_open = False  # its head (line and headers) has begun and is not complete
    _head_bytes = 0  # bytes received since the head began (an upper bound on its size)
    _head_size = 0  # the size of its line and headers as parsed
    _began_in_chunk = False  # in the chunk being parsed: a head began,
    _ended_in_chunk = False  # and a request ended

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        if self._answered:
            return  # lingering after our error: what the client still sends is dropped
        self._began_in_chunk = self._ended_in_chunk = False
        super().data_received(data)
        if self._answered or self.transport.is_closing():
            return
        if self._head_open:
            # A chunk in which a request ended before this head began held that request's
            # bytes too: the head is counted from the next chunk, within a chunk of exact.
            if not (self._began_in_chunk and self._ended_in_chunk):
                self._head_bytes += len(data)
            if self._head_bytes > MAX_HEADER_BYTES:  # and still not complete
                self.send_400_response("")
        elif not self._in_message:
            # Bytes that began no request (llhttp skips blank lines between requests), and
            # that uvicorn's keep-alive timer stopped for: the header timeout holds them.
            self._arm()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_message = self._head_open = self._began_in_chunk = True
        self._head_bytes = self._head_size = 0
        self._arm()

    def on_url(self, url: bytes) -> None:
        self._head_size += len(url)
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._head_size += len(name) + len(value) + 4
        if self._head_size > MAX_HEADER_BYTES:
            raise HeadTooLarge  # httptools stops and raises HttpParserError: a 400
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._head_open = False
        self._disarm()
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._in_message = False
        self._ended_in_chunk = True
        super().on_message_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        if self._header_timer is None:
            self._header_timer = self.loop.call_later(self.header_timeout, self._too_slow)

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _responding(self) -> bool:
        return self.cycle is not None and not self.cycle.response_complete

    def _too_slow(self) -> None:
        self._header_timer = None
        if self.transport.is_closing():
            return
        if self._responding():
            self._arm()  # a pipelined head behind a response still being sent: after it
            return
        if self._in_message and not self._head_open:
            return  # a request's body is arriving: not the head's timeout
        if not self._head_open and self.timeout_keep_alive_task is not None:
            return  # idle between requests: uvicorn's keep-alive timeout closes it
        self._reply(
            408,
            "Request Timeout",
            f"the request's headers did not arrive within {self.header_timeout:g}s "
            "(FARM_GATEWAY_HEADER_TIMEOUT)",
            "request_timeout",
        )

    def send_400_response(self, msg: str) -> None:
        self._disarm()
        if self._responding():
            # A bad request pipelined behind a response still being sent: that response
            # is finished first, then the connection closed (an answer written now would
            # cut into it).
            self._answered = True
            self.cycle.keep_alive = False
            return
        self._reply(
            400,
            "Bad Request",
            f"not a valid HTTP/1.1 request, or its headers are over {MAX_HEADER_BYTES // 1024} KiB",
            "invalid_http_request",
        )

    def _reply(self, status: int, reason: str, message: str, code: str) -> None:
        """Answer and close, written as bytes: there is no request to answer in these states."""
        error = {"message": message, "type": "invalid_request_error", "param": None, "code": code}
        body = json.dumps({"error": error}).encode()
        head = (
            f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
        )
        self._answered = True
        self.transport.write(head.encode() + body)
        # Closing with the client's bytes unread would reset the connection, and the client
        # might never read the answer: end our side, drop what still comes, close soon.
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self.loop.call_later(LINGER_S, self.transport.close)


def gateway_config(app: Any, **kwargs: Any) -> uvicorn.Config:
    """uvicorn's Config for the gateway `app`, with farm's protocol and limits."""
    protocol = type(
        "GatewayProtocol",
        (GatewayProtocol,),
        {"header_timeout": get_settings().gateway_header_timeout},
    )
    return uvicorn.Config(
        app,
        http=protocol,
        log_level="warning",
        **kwargs,
    )
