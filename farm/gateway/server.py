"""The gateway's HTTP server: uvicorn on h11, with what farm adds at the connection level.

- A request's headers must arrive within FARM_GATEWAY_HEADER_TIMEOUT seconds of its first
  byte (of the connection, for the first request): a client that trickles them (slow-loris)
  gets 408 and its connection is closed, instead of holding it forever.
- What uvicorn answers itself before the app sees a request (a request that is not HTTP,
  headers over MAX_HEADER_BYTES) is in OpenAI's JSON error shape, as every other error of
  the gateway, not plain text.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from farm.config import get_settings

MAX_HEADER_BYTES = 64 * 1024
LINGER_S = 2.0  # how long a connection answered with an error drains before closing


class GatewayProtocol(H11Protocol):
    """uvicorn's h11 protocol with a header timeout and JSON errors (see the module)."""

    header_timeout: float = 10.0
    _header_timer: asyncio.TimerHandle | None = None
    _answered = False  # an error was sent; the connection lingers, then closes

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        if self._answered:
            return  # lingering after our error: what the client still sends is dropped
        super().data_received(data)
        if self.conn.their_state is h11.IDLE:  # still reading a request's headers
            self._arm()
        else:
            self._disarm()

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

    def _too_slow(self) -> None:
        self._header_timer = None
        if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
            return
        self._reply(
            408,
            "Request Timeout",
            f"the request's headers did not arrive within {self.header_timeout:g}s "
            "(FARM_GATEWAY_HEADER_TIMEOUT)",
            "request_timeout",
        )

    def send_400_response(self, msg: str) -> None:
        self._disarm()
        self._reply(
            400,
            "Bad Request",
            f"not a valid HTTP/1.1 request, or its headers are over {MAX_HEADER_BYTES // 1024} KiB",
            "invalid_http_request",
        )

    def _reply(self, status: int, reason: str, message: str, code: str) -> None:
        """Answer and close, written as bytes: h11 has no request to answer in these states."""
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
        h11_max_incomplete_event_size=MAX_HEADER_BYTES,
        log_level="warning",
        **kwargs,
    )
