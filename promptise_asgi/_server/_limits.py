"""Size and time limits for the servers `AppServer` drives (SPEC 18, "Sizes and times").

`ServerLimits` holds and checks the three numbers. uvicorn enforces them through `uvicorn_protocol()`, its own
HTTP protocol with a per-connection watchdog; hypercorn through its config (`configure_hypercorn()`) plus
`limit_requests()`, a pure-ASGI wrapper for what that config cannot express. Knows servers and ASGI messages, not
the apps served. Nothing here imports uvicorn until `uvicorn_protocol()` is called: under trio it is never loaded.
"""

from __future__ import annotations

import asyncio
import importlib.util
from dataclasses import dataclass
from typing import Any, cast

import anyio
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .._validation import check_count, check_seconds

__all__ = [
    "ServerLimits",
    "configure_hypercorn",
    "limit_requests",
    "refuse_large_heads",
    "uvicorn_options",
    "uvicorn_protocol",
]

HEADER_TOO_LARGE = b'{"error": "Request header fields too large"}'
BUSY = b'{"error": "Server busy: too many concurrent requests"}'
BODY_TIMED_OUT = b'{"error": "Request body timed out"}'


@dataclass(frozen=True)
class ServerLimits:
    """The limits one server enforces; see `AppServer` for what each means.

    Raises:
        ValueError: a value that is not a positive number (an integer for the first two; a bool is neither),
            naming the keyword.
    """

    limit_concurrency: int = 2048
    max_header_bytes: int = 64 * 1024
    read_timeout: float = 10.0

    def __post_init__(self) -> None:
        check_count("limit_concurrency", self.limit_concurrency)
        check_count("max_header_bytes", self.max_header_bytes)
        check_seconds("read_timeout", self.read_timeout)


def head_size(scope: Scope) -> int:
    """The size of a request's line and header fields as sent, give or take the spacing a client chose."""
    size = len(scope["method"]) + len(scope.get("raw_path") or scope["path"]) + len(scope["query_string"]) + 14
    for name, value in scope["headers"]:
        size += len(name) + len(value) + 4
    return size


async def _answer(send: Send, status: int, body: bytes) -> None:
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
    await send({"type": "http.response.start", "status": status, "headers": [*headers, (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


def refuse_large_heads(app: ASGIApp, max_header_bytes: int) -> ASGIApp:
    """Wrap `app` so that a request whose head is over `max_header_bytes` is answered 431 and never reaches it.

    The servers' own checks only see heads that are still incomplete; a head that completes in the read that
    takes it past the limit gets through them, and here is refused.
    """

    async def refusing(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and head_size(scope) > max_header_bytes:
            await _answer(send, 431, HEADER_TOO_LARGE)
        else:
            await app(scope, receive, send)

    return refusing


def configure_hypercorn(config: Any, limits: ServerLimits) -> None:
    """Set what hypercorn's own config can enforce; `limit_requests()` does the rest."""
    # h11 refuses (431) a head still incomplete past this size.
    config.h11_max_incomplete_size = limits.max_header_bytes
    # hypercorn's idle timer runs from the connection's start (or the end of the previous response) until a
    # complete request head arrives, whatever trickles in meanwhile: a header-read deadline. Its `read_timeout`
    # is not used: it limits every read, so it would also cut a long response to a client that sends nothing.
    config.keep_alive_timeout = min(config.keep_alive_timeout, limits.read_timeout)


def limit_requests(app: ASGIApp, limits: ServerLimits) -> ASGIApp:
    """Wrap `app` (served by hypercorn) with the limits hypercorn's config cannot express.

    A head over `max_header_bytes` is answered 431; an HTTP request beyond `limit_concurrency` in flight, 503; and
    when the app waits more than `read_timeout` for the next chunk of an incomplete request body, it receives
    `http.disconnect` and the client a 408 (unless a response had started), then the connection closes.
    """
    in_flight = 0

    async def limited(scope: Scope, receive: Receive, send: Send) -> None:
        nonlocal in_flight
        if scope["type"] != "http":
            await app(scope, receive, send)
        elif in_flight >= limits.limit_concurrency:
            await _answer(send, 503, BUSY)
        else:
            in_flight += 1
            try:
                await _with_body_deadline(app, limits.read_timeout, scope, receive, send)
            finally:
                in_flight -= 1

    return refuse_large_heads(limited, limits.max_header_bytes)


async def _with_body_deadline(app: ASGIApp, read_timeout: float, scope: Scope, receive: Receive, send: Send) -> None:
    body_complete = timed_out = response_started = False

    async def receive_within_deadline() -> Message:
        nonlocal body_complete, timed_out
        if timed_out:
            return {"type": "http.disconnect"}
        if body_complete:  # waiting for a disconnect now: no deadline, or long responses would be cut
            return await receive()
        with anyio.move_on_after(read_timeout):
            message = await receive()
            body_complete = message["type"] != "http.request" or not message.get("more_body", False)
            return message
        timed_out = True
        return {"type": "http.disconnect"}

    async def send_unless_timed_out(message: Message) -> None:
        nonlocal response_started
        if timed_out:
            return  # the app was told the client left; the client is answered 408 below instead
        response_started = response_started or message["type"] == "http.response.start"
        await send(message)

    try:
        await app(scope, receive_within_deadline, send_unless_timed_out)
    except Exception:
        if not timed_out:
            raise
        # Apps commonly raise on a disconnect mid-body (Starlette's ClientDisconnect): the answer is still 408.
    if timed_out and not response_started:
        await _answer(send, 408, BODY_TIMED_OUT)


def uvicorn_protocol(limits: ServerLimits) -> type[asyncio.Protocol]:
    """uvicorn's HTTP protocol (httptools when installed, else h11, as uvicorn chooses) with `limits` enforced.

    Pass it as `uvicorn.Config(http=...)`, with `uvicorn_options(limits)`.
    """
    base: type[asyncio.Protocol]
    if importlib.util.find_spec("httptools") is None:
        from uvicorn.protocols.http.h11_impl import H11Protocol

        base = H11Protocol
    else:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

        base = HttpToolsProtocol
    return cast(type[asyncio.Protocol], type(f"Limited{base.__name__}", (_LimitedProtocol, base), {"limits": limits}))


def uvicorn_options(limits: ServerLimits) -> dict[str, Any]:
    """The `uvicorn.Config` keywords that go with `uvicorn_protocol(limits)`."""
    return {
        # uvicorn answers 503 once `connections >= limit` counting the one asking, so this serves `limit` at once.
        "limit_concurrency": limits.limit_concurrency + 1,
        # h11 refuses a head still incomplete past this size (uvicorn answers 400); httptools has no such limit.
        "h11_max_incomplete_event_size": limits.max_header_bytes,
    }


class _LimitedProtocol(asyncio.Protocol):
    """Mixed into uvicorn's own HTTP protocol class by `uvicorn_protocol()`.

    uvicorn has no limit on a request head's size with httptools, no deadline for a head (its keep-alive timer
    runs only after a response, and the first byte of a request stops it) and none for a stalled body. So this
    subclasses its protocol and reads its per-connection state: `cycle` (the current request, with `more_body`,
    `response_complete` and `waiting_for_100_continue`), `flow.read_paused`, and `app`, the app a new request
    is started with. `test_uvicorn_internals_the_limits_rely_on` fails loudly if an upgrade moves any of them, and
    pyproject.toml pins uvicorn to the minor version they were read from. The hot path gains a clock read and a
    few comparisons per read; the deadlines are checked by a timer about once a second per connection.
    """

    limits: ServerLimits
    # uvicorn's, set by the protocol class this is mixed into.
    app: Any
    cycle: Any
    flow: Any
    loop: asyncio.AbstractEventLoop
    transport: asyncio.Transport

    _head_since: float | None  # when the pending request head began (None: none pending)
    _head_cycle: Any  # the request that was current then: once `cycle` is another one, that head completed
    _head_bytes = 0
    _last_read = 0.0
    _watchdog: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        # A new connection owes a complete head within read_timeout, whether it sends anything or not.
        self._head_since = self._last_read = self.loop.time()
        self._head_cycle = None
        self._watchdog = self.loop.call_later(self._tick(), self._check_deadlines)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        now = self._last_read = self.loop.time()
        cycle = self.cycle
        reading_body = cycle is not None and cycle.more_body and not cycle.response_complete
        if self._head_bytes + len(data) > self.limits.max_header_bytes:
            self._receive_checking_head_size(data)
        else:
            super().data_received(data)
        if reading_body or self.cycle is not cycle:  # body bytes, or a request head completed
            self._head_since, self._head_bytes = None, 0
            return
        # No request body is being read, so these bytes are (part of) the next request's head. After an early
        # response they may be the rest of an unread body: those share the head's size and deadline.
        if self._head_since is None or self._head_cycle is not cycle:
            self._head_since, self._head_cycle, self._head_bytes = now, cycle, 0
        self._head_bytes += len(data)
        if self._head_bytes > self.limits.max_header_bytes:
            self._refuse_head()

    def _receive_checking_head_size(self, data: bytes) -> None:
        # This read may complete a head that is over the limit: a request it starts is answered 431 instead.
        app = self.app
        self.app = refuse_large_heads(app, self.limits.max_header_bytes)
        try:
            super().data_received(data)
        finally:
            self.app = app

    def _refuse_head(self) -> None:
        if self.transport.is_closing():
            return  # the parser refused it first (h11 answers 400 past h11_max_incomplete_event_size)
        cycle = self.cycle
        if cycle is None or (cycle.response_complete and not cycle.more_body):
            # Between messages the client can read an answer; in the middle of one it would be garbage.
            length = b"%d" % len(HEADER_TOO_LARGE)
            self.transport.write(
                b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: application/json\r\n"
                b"content-length: " + length + b"\r\nconnection: close\r\n\r\n" + HEADER_TOO_LARGE
            )
        self.transport.close()

    def _tick(self) -> float:
        return min(1.0, self.limits.read_timeout / 4)

    def _check_deadlines(self) -> None:
        transport = self.transport
        if transport.is_closing() or transport.get_protocol() is not self:
            return  # closed, or handed over to a WebSocket protocol: nothing left to watch
        now = self.loop.time()
        cycle = self.cycle
        if self.flow.read_paused:
            # The server is not reading (the app has not taken the body so far, or a pipelined request waits its
            # turn): the client cannot be the one stalling. Its clocks restart when reading does.
            self._last_read = now
            if self._head_since is not None:
                self._head_since = now
            late = False
        elif self._head_since is not None and self._head_cycle is cycle:
            late = now - self._head_since > self.limits.read_timeout
        elif cycle is not None and cycle.more_body and not cycle.response_complete:
            if cycle.waiting_for_100_continue:
                self._last_read = now  # the client waits for "100 Continue", sent once the app reads
            late = now - self._last_read > self.limits.read_timeout
        else:
            late = False  # idle between requests (uvicorn's keep-alive timer), or the app is answering
        if late:
            transport.close()
        else:
            self._watchdog = self.loop.call_later(self._tick(), self._check_deadlines)
