"""`NodeClient`: the async client for one node's HTTP API (SPEC section 3), on httpx and anyio.

It turns every answer into decoded JSON or into one of the package's node errors (`NodeError`,
`NodeUnreachableError`, `NodeTimeoutError`). It knows the node's URL layout and nothing of the runtime, the
transport app, Starlette or discovery.
"""

from __future__ import annotations

import contextlib
from json import loads as json_loads
from types import TracebackType
from typing import Any
from urllib.parse import quote, urlsplit

import anyio
import httpx

from .._errors import NodeError, NodeResponseTooLargeError, NodeTimeoutError, NodeUnreachableError, answer_error_text
from .._request_id import CURRENT_REQUEST_ID
from .._validation import check_count, check_idempotency_key, check_seconds, clean_token, normalize_url, redact_url
from ._stream import ChangeStream

__all__ = ["NodeClient", "event_body", "path_segment"]


def _check_token(auth_token: str | None) -> dict[str, str]:
    if auth_token is None:
        return {}
    return {"Authorization": f"Bearer {clean_token(auth_token)}"}


def _check_base_url(url: str) -> str:
    base = normalize_url(url)
    parts = urlsplit(base)
    if parts.query or parts.fragment:
        raise ValueError("url must be a base URL without a query or fragment")
    return base


def path_segment(name: str) -> str:
    """A process name as one percent-encoded path segment."""
    if not isinstance(name, str) or not name:
        raise ValueError("process name must be a non-empty string")
    segment = quote(name, safe="")
    # quote() leaves dots alone, and a bare "." or ".." segment would be resolved away by URL normalisation.
    if segment in (".", ".."):
        segment = segment.replace(".", "%2E")
    return segment


def _reason(exc: Exception) -> str:
    return str(exc) or type(exc).__name__


class NodeClient:
    """An async client for one node's HTTP API, holding one connection pool.

    Use it as an async context manager (or call `aclose()`); it works on asyncio and trio. Every method
    returns the node's decoded JSON. Process names are sent percent-encoded as one path segment, and a base
    URL with a path prefix (a node mounted at `/runtime`) works. The token is sent as
    `Authorization: Bearer ...` and never appears in `repr()` or in exception messages.

    `timeout` bounds each call as a whole (connecting, sending and reading together), not each step.

    Args:
        url: the node's http(s) base URL, e.g. `http://10.0.0.5:9100` or `http://host:8000/runtime`.
        auth_token: the node's bearer token, or None for an unauthenticated node.
        timeout: seconds a call may take before `NodeTimeoutError` (finite, > 0).
        transport: a custom httpx transport, e.g. `httpx.ASGITransport(app)` to talk to an app in-process.
        max_response_bytes: the largest answer read (decoded); a larger one raises `NodeResponseTooLargeError`
            without being read whole. None (the default) reads any size.

    Raises:
        ValueError: the URL, token, timeout or size limit is invalid.
    """

    __slots__ = (
        "_base",
        "_client",
        "_display",
        "_has_token",
        "_headers",
        "_httpx_timeout",
        "_max_response_bytes",
        "_owns_client",
        "_timeout",
    )

    def __init__(
        self,
        url: str,
        *,
        auth_token: str | None = None,
        timeout: float = 5.0,
        transport: httpx.AsyncBaseTransport | None = None,
        max_response_bytes: int | None = None,
    ) -> None:
        headers = _check_token(auth_token)
        self._setup(url, timeout, bool(headers), max_response_bytes)
        # An owned pool carries the token itself, so requests need no per-call header merge.
        self._client = httpx.AsyncClient(transport=transport, timeout=self._httpx_timeout, headers=headers)
        self._headers: dict[str, str] | None = None
        self._owns_client = True

    @classmethod
    def from_client(
        cls,
        client: httpx.AsyncClient,
        url: str,
        *,
        auth_token: str | None = None,
        timeout: float = 5.0,
        max_response_bytes: int | None = None,
    ) -> NodeClient:
        """Build a client for one node on top of a shared `httpx.AsyncClient` (one pool for many nodes).

        The shared client stays owned by the caller: `aclose()` on the returned `NodeClient` does not close
        it, and the caller closes it once after every `NodeClient` built on it is done. Size its pool
        (`httpx.Limits(max_connections=...)`) for the fan-out, since requests beyond the pool limit wait for a
        free connection (and that wait counts against `timeout`). Leave `base_url` unset on the shared client.

        Args:
            client: the shared httpx client.
            url: the node's http(s) base URL.
            auth_token: the node's bearer token, sent on each request, or None.
            timeout: seconds a call may take before `NodeTimeoutError`.
            max_response_bytes: the largest answer read, or None for any size.

        Returns:
            A `NodeClient` that does not own `client`.

        Raises:
            ValueError: the URL, token, timeout or size limit is invalid.
        """
        self = cls.__new__(cls)
        headers = _check_token(auth_token)
        self._setup(url, timeout, bool(headers), max_response_bytes)
        self._client = client
        self._headers = headers or None
        self._owns_client = False
        return self

    def _setup(self, url: str, timeout: float, has_token: bool, max_response_bytes: int | None) -> None:
        if max_response_bytes is not None:
            check_count("max_response_bytes", max_response_bytes)
        self._max_response_bytes = max_response_bytes
        self._has_token = has_token
        self._base = _check_base_url(url)
        self._display = redact_url(self._base)
        self._timeout = check_seconds("timeout", timeout)
        self._httpx_timeout = httpx.Timeout(self._timeout)

    @property
    def url(self) -> str:
        """The node's base URL, trailing slashes stripped."""
        return self._base

    async def __aenter__(self) -> NodeClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the connection pool, unless it is a shared one (see `from_client`)."""
        if self._owns_client:
            await self._client.aclose()

    async def request(self, method: str, path: str, json: Any = None) -> Any:
        """Send one request to the node and return its decoded JSON (None for an empty 2xx body).

        Args:
            method: the HTTP method, e.g. `"GET"`.
            path: the path below the base URL, already percent-encoded, e.g. `"/processes/a%20b/start"`.
            json: a JSON body to send, or None for no body.

        Returns:
            The decoded JSON of a 2xx answer.

        Raises:
            NodeError: the node answered non-2xx (or a 2xx that is not JSON); `.status_code` and `.message`
                carry its status and its `{"error": ...}` text (or the start of the body).
            NodeTimeoutError: no complete answer within `timeout`.
            NodeUnreachableError: the connection was refused, reset or broken.
        """
        return (await self._exchange(method, path, json))[1]

    async def _exchange(
        self, method: str, path: str, json: Any, headers: dict[str, str] | None = None
    ) -> tuple[int, Any, str]:
        if not path.startswith("/"):
            path = "/" + path
        shown = self._display + path
        answer: tuple[httpx.Response, bytes] | None = None
        try:
            with anyio.move_on_after(self._timeout):
                answer = await self._fetch(method, self._base + path, json, shown, headers)
        except httpx.TimeoutException as exc:
            raise NodeTimeoutError(shown, _reason(exc)) from exc
        except httpx.RequestError as exc:
            raise NodeUnreachableError(shown, _reason(exc)) from exc
        if answer is None:
            raise NodeTimeoutError(shown, f"no complete answer within {self._timeout}s")
        response, content = answer
        if not response.is_success:
            raise NodeError(response.status_code, answer_error_text(content, response.status_code), shown)
        if not content:
            return response.status_code, None, shown
        try:
            return response.status_code, json_loads(content), shown
        except ValueError:
            raise NodeError(response.status_code, "the node's answer is not valid JSON", shown) from None

    async def _fetch(
        self, method: str, url: str, body: Any, shown: str, extra: dict[str, str] | None = None
    ) -> tuple[httpx.Response, bytes]:
        limit = self._max_response_bytes
        headers = self._headers if extra is None else {**(self._headers or {}), **extra}
        request_id = CURRENT_REQUEST_ID.get()
        if request_id is not None:  # a call made while serving a request carries that request's id on
            headers = {**(headers or {}), "X-Request-ID": request_id}
        request = self._client.build_request(method, url, json=body, headers=headers, timeout=self._httpx_timeout)
        response = await self._client.send(request, stream=True)
        chunks: list[bytes] = []
        try:
            declared = response.headers.get("content-length", "")
            if limit is not None and declared.isdigit() and int(declared) > limit:
                raise NodeResponseTooLargeError(shown, limit)
            size = 0
            body_chunks = response.aiter_bytes()
            async for chunk in body_chunks:
                size += len(chunk)
                if limit is not None and size > limit:  # counted after decoding: a compressed bomb stops here too
                    break
                chunks.append(chunk)
            else:
                return response, b"".join(chunks)
            # Hang up, then let httpx's chain of body generators run into the closed connection and end: on
            # trio, generators left half-read are reported when garbage collected.
            await response.aclose()
            with contextlib.suppress(Exception):
                async for _ in body_chunks:
                    pass
            raise NodeResponseTooLargeError(shown, limit)
        finally:
            await response.aclose()

    async def _object(
        self, method: str, path: str, json: Any = None, headers: dict[str, str] | None = None
    ) -> dict[str, Any]:
        status_code, result, shown = await self._exchange(method, path, json, headers)
        if not isinstance(result, dict):
            raise NodeError(status_code, f"expected a JSON object, got {type(result).__name__}", shown)
        return result

    async def health(self) -> dict[str, Any]:
        """GET /health: `{"status", "node_id", "process_count"}` (open even on authenticated nodes)."""
        return await self._object("GET", "/health")

    async def status(self) -> dict[str, Any]:
        """GET /status: the runtime's status plus `"node_id"`."""
        return await self._object("GET", "/status")

    async def processes(self) -> dict[str, Any]:
        """GET /processes: `{"node_id", "processes": [{"name", "state", "process_id"}, ...]}`."""
        return await self._object("GET", "/processes")

    async def process_status(self, name: str) -> dict[str, Any]:
        """GET /processes/{name}/status: the process status dict.

        Raises:
            ValueError: `name` is empty.
            NodeError: e.g. 404 when the process does not exist.
        """
        return await self._object("GET", f"/processes/{path_segment(name)}/status")

    async def start(self, name: str) -> dict[str, Any]:
        """POST /processes/{name}/start: `{"status": "started", "name", "changed"}`."""
        return await self._object("POST", f"/processes/{path_segment(name)}/start")

    async def stop(self, name: str) -> dict[str, Any]:
        """POST /processes/{name}/stop: `{"status": "stopped", "name", "changed"}`."""
        return await self._object("POST", f"/processes/{path_segment(name)}/stop")

    async def restart(self, name: str) -> dict[str, Any]:
        """POST /processes/{name}/restart: `{"status": "restarted", "name"}`."""
        return await self._object("POST", f"/processes/{path_segment(name)}/restart")

    async def inject_event(
        self,
        name: str,
        payload: dict[str, Any] | None = None,
        *,
        trigger_id: str = "remote",
        trigger_type: str = "remote",
        metadata: dict[str, Any] | None = None,
        idempotency_key: str | None = None,
    ) -> dict[str, Any]:
        """POST /processes/{name}/event: queue an event; returns `{"status": "injected", "event_id", ...}`.

        Args:
            name: the process name.
            payload: the event payload (a JSON object); None sends `{}`.
            trigger_id: the event's trigger id.
            trigger_type: the event's trigger type.
            metadata: the event metadata (a JSON object); None sends `{}`.
            idempotency_key: sent as `Idempotency-Key` (1-255 printable ASCII characters): calling again with
                the same key and arguments, after a timeout say, queues nothing and returns the first answer.

        Raises:
            ValueError: a bad `idempotency_key`.
            NodeError: e.g. 404 unknown process, 400 bad body, 413 too large, 422 key reused with other
                arguments, 429 queue full.
        """
        body = event_body(payload, trigger_id, trigger_type, metadata)
        headers = None if idempotency_key is None else {"Idempotency-Key": check_idempotency_key(idempotency_key)}
        return await self._object("POST", f"/processes/{path_segment(name)}/event", body, headers)

    async def dead_letters(self, name: str, *, limit: int = 100) -> dict[str, Any]:
        """GET /processes/{name}/dead-letters: `{"process", "dead_letters": [...]}`, the newest `limit`, oldest first.

        Raises:
            NodeError: e.g. 404 unknown process, 501 a runtime without an event store.
        """
        return await self._object("GET", f"/processes/{path_segment(name)}/dead-letters?limit={int(limit)}")

    async def retry_dead_letter(self, name: str, event_id: str) -> dict[str, Any]:
        """POST /processes/{name}/dead-letters/{event_id}/retry: queue a dead letter again (202).

        Raises:
            NodeError: e.g. 404 unknown process or dead letter, 429 queue full.
        """
        return await self._object(
            "POST", f"/processes/{path_segment(name)}/dead-letters/{path_segment(event_id)}/retry"
        )

    async def delete_dead_letter(self, name: str, event_id: str) -> dict[str, Any]:
        """DELETE /processes/{name}/dead-letters/{event_id}: forget a dead letter.

        Raises:
            NodeError: e.g. 404 unknown process or dead letter.
        """
        return await self._object("DELETE", f"/processes/{path_segment(name)}/dead-letters/{path_segment(event_id)}")

    def changes(self, *, last_event_id: int | None = None) -> ChangeStream:
        """GET /changes: the node's changes as they happen, reconnecting and resuming by id on their own.

        The first change is a `snapshot` (the `/status` body) unless `last_event_id` can be resumed from; then
        `process.state`, `process.counters`, `process.added`, `process.removed`, `node.phase`, ...

        Example::

            async with client.changes() as changes:
                async for change in changes:
                    print(change.id, change.type, change.data)

        Raises:
            NodeError: (while iterating) the node refused the stream for good (401, 403, 404).
        """
        return ChangeStream(self._client, self._base + "/changes", headers=self._headers, last_event_id=last_event_id)

    def __repr__(self) -> str:
        token = "'***'" if self._has_token else "None"
        return f"NodeClient({self._display!r}, auth_token={token}, timeout={self._timeout})"


def event_body(
    payload: dict[str, Any] | None, trigger_id: str, trigger_type: str, metadata: dict[str, Any] | None
) -> dict[str, Any]:
    """The JSON body of an injected event (SPEC 3)."""
    return {
        "trigger_id": trigger_id,
        "trigger_type": trigger_type,
        "payload": {} if payload is None else payload,
        "metadata": {} if metadata is None else metadata,
    }
