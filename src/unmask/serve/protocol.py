"""uvicorn's HTTP/1.1 protocol (h11) with read deadlines and a bound on half-open connections.

uvicorn times out idle keep-alive connections, but not a client that sends its headers a line a second, its
body a byte a second, fewer bytes than its Content-Length, or nothing at all after connecting: each holds a
connection (and its memory) for as long as it likes. Here:

- a request's headers must arrive within `header_timeout` seconds of its first byte (of the connection, for
  the first request), and its body within `body_timeout` seconds of the headers; otherwise the server answers
  408 (unless it has begun answering already) and closes the connection;
- at most `max_half_open` connections may be half-open at once (headers or body still arriving): one more
  closes the oldest, so a flood of slow clients cannot keep out the clients that send whole requests.

The 408 is written straight to the socket (h11 may have no request to answer), then the connection is closed
after a short linger that discards what the client still sends: closing at once would make the kernel answer
those bytes with a reset, which can destroy the 408 before the client reads it.
"""

from __future__ import annotations

import asyncio
import json
from collections import OrderedDict

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

LINGER_S = 1.0


def timeout_response(part: str, seconds: float) -> bytes:
    body = json.dumps({"error": {"message": f"{part}: not received within {seconds:g} s",
                                 "type": "invalid_request_error", "param": part, "code": None}}).encode()
    return (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\nconnection: close\r\n"
            b"content-length: %d\r\n\r\n" % len(body)) + body


class GuardedH11Protocol(H11Protocol):
    """Set by `guarded_protocol`: the deadlines, the bound, and the registry its connections share."""

    header_timeout: float = 10.0
    body_timeout: float = 30.0
    max_half_open: int = 128
    half_open: OrderedDict  # connections reading a request, oldest first

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._reading: str | None = None  # "headers" or "body" while a request is arriving
        self._deadline: asyncio.TimerHandle | None = None
        self._lingering = False
        self._track()

    def data_received(self, data: bytes) -> None:
        if self._lingering:  # answered and closing: what still comes is dropped
            return
        super().data_received(data)
        self._track()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._track()  # a pipelined request may be half here already

    def connection_lost(self, exc: Exception | None) -> None:
        self._set_reading(None)
        super().connection_lost(exc)

    # --- inside -------------------------------------------------------------------------------------
    def _part_arriving(self) -> str | None:
        if self.transport.is_closing() or self._lingering:
            return None
        state = self.conn.their_state
        if state is h11.SEND_BODY:
            return "body"
        # a new connection with no request yet, or part of the next request buffered
        if state is h11.IDLE and (self.cycle is None or self.conn.trailing_data[0]):
            return "headers"
        return None

    def _track(self) -> None:
        self._set_reading(self._part_arriving())

    def _set_reading(self, part: str | None) -> None:
        if part == self._reading:
            return
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        self._reading = part
        if part is None:
            self.half_open.pop(self, None)
            return
        seconds = self.header_timeout if part == "headers" else self.body_timeout
        self._deadline = self.loop.call_later(seconds, self._too_slow, part, seconds)
        if self not in self.half_open:
            while len(self.half_open) >= self.max_half_open:
                oldest, _ = self.half_open.popitem(last=False)
                oldest.logger.warning("closing a half-open connection: %d others are half-open", self.max_half_open)
                oldest.transport.close()
            self.half_open[self] = None

    def _too_slow(self, part: str, seconds: float) -> None:
        self._deadline = None
        if self._reading != part or self.transport.is_closing():
            return
        if self.cycle is None or not self.cycle.response_started:
            self.transport.write(timeout_response(part, seconds))
        if self.cycle is not None:  # the app, if reading the body, hears a disconnect
            self.cycle.disconnected = True
            self.cycle.message_event.set()
        self._lingering = True
        self._set_reading(None)
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self.loop.call_later(LINGER_S, self.transport.close)


def guarded_protocol(header_timeout: float = 10.0, body_timeout: float = 30.0,
                     max_half_open: int = 128) -> type[GuardedH11Protocol]:
    """The protocol class of one server (uvicorn.Config(http=...)): its own limits and registry."""
    return type("GuardedH11Protocol", (GuardedH11Protocol,),
                {"header_timeout": header_timeout, "body_timeout": body_timeout, "max_half_open": max_half_open,
                 "half_open": OrderedDict()})
