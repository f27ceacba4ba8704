"""Server-Sent Events over a `ChangeHub`: the `text/event-stream` answer of `/changes` and `/cluster/changes`.

Each message is `id:`, `event:` and a JSON `data:` line; a `: ping` comment keeps proxies from closing a quiet
stream. The resume point comes from `Last-Event-ID` or `?last_event_id=` (for clients that cannot set
headers). The encoder is a few lines written here rather than sse-starlette's response, which watches
uvicorn's exit by patching its signal handling: the servers this project drives leave signals to the host.
"""

from __future__ import annotations

import anyio
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from .._changes import Change, ChangeHub, Subscription
from ._responses import dumps, error_response

__all__ = ["DEFAULT_PING_INTERVAL", "encode_change", "event_stream", "requested_last_event_id"]

DEFAULT_PING_INTERVAL = 15.0
_PING = b": ping\n\n"


def encode_change(change: Change) -> bytes:
    """One SSE message: `id`, `event` and the JSON data on one `data:` line."""
    return b"id: %d\nevent: %s\ndata: %s\n\n" % (change.id, change.type.encode(), dumps(change.data))


def requested_last_event_id(request: Request) -> int | None:
    """Where the client asks to resume: `Last-Event-ID`, else `?last_event_id=`; None when absent or not a number."""
    text = request.headers.get("last-event-id") or request.query_params.get("last_event_id")
    if text is None or not text.strip().isdigit():
        return None
    return int(text.strip())


def event_stream(hub: ChangeHub, request: Request, *, ping_interval: float = DEFAULT_PING_INTERVAL) -> Response:
    """The streaming answer for one subscriber of `hub`, resuming where the request asks to.

    The stream ends when the hub cuts the subscriber off (it fell behind: it reconnects and resumes by id) or
    closes (the server is stopping), or when the client goes away.
    """
    try:
        subscription = hub.subscribe(requested_last_event_id(request))
    except anyio.ClosedResourceError:
        return error_response(503, "The change stream is closed: the server is stopping")
    return _EventStreamResponse(subscription, ping_interval)


class _EventStreamResponse(Response):
    """Sends a subscription's changes as SSE until it ends or the client leaves.

    Written as plain ASGI rather than a `StreamingResponse` over an async generator: a generator left
    half-run when the client disconnects is reported by trio when garbage collected, and the subscription
    must be closed at once, not whenever that happens.
    """

    def __init__(self, subscription: Subscription, ping_interval: float) -> None:
        # No Response.__init__: it would announce a Content-Length, and a stream has none.
        self.status_code = 200
        self.background = None
        self.raw_headers = [
            (b"content-type", b"text/event-stream; charset=utf-8"),
            (b"cache-control", b"no-cache"),
            (b"x-accel-buffering", b"no"),
        ]
        self.subscription = subscription
        self.ping_interval = ping_interval

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async with self.subscription, anyio.create_task_group() as tg:

            async def until_disconnect() -> None:
                while (await receive())["type"] != "http.disconnect":
                    pass
                tg.cancel_scope.cancel()

            tg.start_soon(until_disconnect)
            await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
            try:
                await self._stream(send)
                await send({"type": "http.response.body", "body": b"", "more_body": False})
            except OSError:
                pass  # the client went away mid-send (ASGI 2.4 servers say so by raising)
            tg.cancel_scope.cancel()

    async def _stream(self, send: Send) -> None:
        while True:
            change: Change | None = None
            with anyio.move_on_after(self.ping_interval):
                try:
                    change = await self.subscription.receive()
                except anyio.EndOfStream:
                    return
            chunk = _PING if change is None else encode_change(change)
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
