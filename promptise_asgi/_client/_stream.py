"""`ChangeStream`: read a node's or a coordinator's change stream over HTTP, reconnecting and resuming by id.

Server-Sent Events are parsed by httpx-sse, a maintained parser (multi-line data, comments, CR/LF variants),
over the caller's httpx client. A dropped connection, a server restart or a cut-off for falling behind is
followed by a reconnection with backoff that resumes after the last id received (`Last-Event-ID`); the
server answers with what came after it, or with a fresh snapshot when it can no longer replay. A refusal
that retrying cannot fix (401, 403, 404) raises. Knows httpx and the wire format, nothing of the servers.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncGenerator, Callable, Mapping
from types import TracebackType
from typing import Any

import anyio
import httpx
from httpx_sse import EventSource, ServerSentEvent

from .._changes import Change
from .._errors import NodeError, answer_error_text

__all__ = ["ChangeStream"]

# Statuses that no amount of retrying changes: the caller must fix its token or its URL.
_FINAL = frozenset({400, 401, 403, 404, 405, 410})


class ChangeStream:
    """An async iterator of `Change`s that reconnects with backoff and resumes by id on its own.

    Use it as `async with ... as stream: async for change in stream:` so the connection is closed when you
    stop; iterating never ends on its own while the server can be reached again.

    Args:
        client: the httpx client to use (its pool, its headers).
        url: the stream's URL (`.../changes` or `.../cluster/changes`).
        headers: headers for every request (the bearer token of a shared pool).
        last_event_id: resume after this id (None: start with a snapshot).
        refused: builds the exception raised when the server refuses the stream for good, from the status,
            the server's message and the URL (default: `NodeError`).
        read_timeout: seconds without any byte (servers ping every 15 s) before reconnecting.
        backoff: first and longest pause between reconnection attempts, in seconds.

    Attributes:
        last_event_id: the id of the last change received (where a reconnection resumes).
        reconnects: how many times the stream reconnected.
    """

    def __init__(
        self,
        client: httpx.AsyncClient,
        url: str,
        *,
        headers: Mapping[str, str] | None = None,
        last_event_id: int | None = None,
        read_timeout: float = 60.0,
        backoff: tuple[float, float] = (0.25, 10.0),
        refused: Callable[[int, str, str], Exception] = NodeError,
    ) -> None:
        self._refused = refused
        self._client = client
        self._url = url
        self._headers = dict(headers or {})
        self._timeout = httpx.Timeout(10.0, read=read_timeout)
        self._backoff = backoff
        self._pause = backoff[0]
        self._response: httpx.Response | None = None
        self._events: AsyncGenerator[ServerSentEvent, None] | None = None
        self._closed = False
        self.last_event_id = last_event_id
        self.reconnects = 0

    def __aiter__(self) -> ChangeStream:
        return self

    async def __anext__(self) -> Change:
        while not self._closed:
            if self._events is None:
                await self._connect()
                continue
            try:
                event = await self._events.__anext__()
            except (StopAsyncIteration, httpx.HTTPError, anyio.BrokenResourceError, anyio.EndOfStream):
                await self._drop()
                continue
            change = _change(event)
            if change is not None:
                self.last_event_id = change.id
                self._pause = self._backoff[0]
                return change
        raise StopAsyncIteration

    async def _connect(self) -> None:
        if self.reconnects or self._response is not None:
            await anyio.sleep(self._pause)
            self._pause = min(self._pause * 2, self._backoff[1])
        headers = {**self._headers, "Accept": "text/event-stream", "Cache-Control": "no-store"}
        if self.last_event_id is not None:
            headers["Last-Event-ID"] = str(self.last_event_id)
        request = self._client.build_request("GET", self._url, headers=headers, timeout=self._timeout)
        try:
            response = await self._client.send(request, stream=True)
        except httpx.HTTPError:
            self.reconnects += 1
            return
        self._response = response
        if response.status_code in _FINAL:
            await response.aread()
            await response.aclose()
            self._closed = True
            raise self._refused(
                response.status_code, answer_error_text(response.content, response.status_code), self._url
            )
        if not response.is_success or "text/event-stream" not in response.headers.get("content-type", ""):
            await response.aclose()
            self.reconnects += 1
            return
        self._events = EventSource(response).aiter_sse()

    async def _drop(self) -> None:
        """Close the current connection (and the parser's generators with it) before reconnecting."""
        response, events = self._response, self._events
        self._events = None
        if response is not None:
            await response.aclose()
        if events is not None:
            # The parser's generators now run into the closed connection and end: none is left half-read,
            # which trio reports when it is garbage collected.
            with contextlib.suppress(Exception):
                async for _ in events:
                    pass
        self.reconnects += 1

    async def aclose(self) -> None:
        """Close the connection; iterating afterwards ends at once."""
        self._closed = True
        await self._drop()

    async def __aenter__(self) -> ChangeStream:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()


def _change(event: ServerSentEvent) -> Change | None:
    if not event.id or not event.id.isdigit():
        return None  # not one of ours (comments never reach here: the parser drops them)
    try:
        data: Any = json.loads(event.data)
    except ValueError:
        return None
    return Change(int(event.id), event.event, data if isinstance(data, dict) else {"value": data})
