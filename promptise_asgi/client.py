"""The async clients for a node's HTTP API (SPEC section 3) and a coordinator's (SPEC 8.2), on httpx and anyio.

`NodeClient` turns every answer into decoded JSON or into one of the package's node errors (`NodeError`,
`NodeUnreachableError`, `NodeTimeoutError`, defined in `_errors` and re-exported here). `CoordinatorClient`
does the same for a coordinator, with errors that name the coordinator (`CoordinatorError`, ...). They know
the URL layouts and nothing of the runtime, the apps, Starlette or discovery.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from json import loads as json_loads
from types import TracebackType
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

import anyio
import httpx

from promptise_asgi._errors import (
    CoordinatorError,
    CoordinatorTimeoutError,
    CoordinatorUnreachableError,
    NodeError,
    NodeResponseTooLargeError,
    NodeTimeoutError,
    NodeUnreachableError,
)
from promptise_asgi._validation import clean_token, normalize_url, validate_metadata, validate_node_id

__all__ = [
    "CoordinatorClient",
    "CoordinatorError",
    "CoordinatorTimeoutError",
    "CoordinatorUnreachableError",
    "NodeClient",
    "NodeError",
    "NodeResponseTooLargeError",
    "NodeTimeoutError",
    "NodeUnreachableError",
]

# An error page can be large (an HTML 502 from a proxy); keep exception messages readable.
_MAX_MESSAGE_CHARS = 500


def _check_token(auth_token: str | None) -> dict[str, str]:
    if auth_token is None:
        return {}
    return {"Authorization": f"Bearer {clean_token(auth_token)}"}


def _check_timeout(timeout: float) -> float:
    if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not math.isfinite(timeout):
        raise ValueError(f"timeout must be a finite number of seconds > 0, got {timeout!r}")
    if timeout <= 0:
        raise ValueError(f"timeout must be a finite number of seconds > 0, got {timeout!r}")
    return float(timeout)


def _check_base_url(url: str) -> str:
    base = normalize_url(url)
    parts = urlsplit(base)
    if parts.query or parts.fragment:
        raise ValueError("url must be a base URL without a query or fragment")
    return base


def _redacted(url: str) -> str:
    # A password in the URL's userinfo would otherwise leak into reprs and exception messages.
    parts = urlsplit(url)
    if parts.password is None:
        return url
    userinfo, _, hostport = parts.netloc.rpartition("@")
    user = userinfo.partition(":")[0]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{hostport}"))


def _segment(name: str) -> str:
    if not isinstance(name, str) or not name:
        raise ValueError("process name must be a non-empty string")
    segment = quote(name, safe="")
    # quote() leaves dots alone, and a bare "." or ".." segment would be resolved away by URL normalisation.
    if segment in (".", ".."):
        segment = segment.replace(".", "%2E")
    return segment


def _error_message(response: httpx.Response, content: bytes) -> str:
    try:
        body = json_loads(content)
    except ValueError:
        body = None
    if isinstance(body, dict) and isinstance(body.get("error"), str):
        message: str = body["error"]
    else:
        message = content.decode(response.encoding or "utf-8", "replace").strip() or response.reason_phrase
        message = message or "no message"
    if len(message) > _MAX_MESSAGE_CHARS:
        message = message[:_MAX_MESSAGE_CHARS] + "..."
    return message


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
        if max_response_bytes is not None and (
            isinstance(max_response_bytes, bool) or not isinstance(max_response_bytes, int) or max_response_bytes < 1
        ):
            raise ValueError(f"max_response_bytes must be an integer >= 1 or None, got {max_response_bytes!r}")
        self._max_response_bytes = max_response_bytes
        self._has_token = has_token
        self._base = _check_base_url(url)
        self._display = _redacted(self._base)
        self._timeout = _check_timeout(timeout)
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

    async def _exchange(self, method: str, path: str, json: Any) -> tuple[int, Any, str]:
        if not path.startswith("/"):
            path = "/" + path
        shown = self._display + path
        answer: tuple[httpx.Response, bytes] | None = None
        try:
            with anyio.move_on_after(self._timeout):
                answer = await self._fetch(method, self._base + path, json, shown)
        except httpx.TimeoutException as exc:
            raise NodeTimeoutError(shown, _reason(exc)) from exc
        except httpx.RequestError as exc:
            raise NodeUnreachableError(shown, _reason(exc)) from exc
        if answer is None:
            raise NodeTimeoutError(shown, f"no complete answer within {self._timeout}s")
        response, content = answer
        if not response.is_success:
            raise NodeError(response.status_code, _error_message(response, content), shown)
        if not content:
            return response.status_code, None, shown
        try:
            return response.status_code, json_loads(content), shown
        except ValueError:
            raise NodeError(response.status_code, "the node's answer is not valid JSON", shown) from None

    async def _fetch(self, method: str, url: str, body: Any, shown: str) -> tuple[httpx.Response, bytes]:
        limit = self._max_response_bytes
        request = self._client.build_request(method, url, json=body, headers=self._headers, timeout=self._httpx_timeout)
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

    async def _object(self, method: str, path: str, json: Any = None) -> dict[str, Any]:
        status_code, result, shown = await self._exchange(method, path, json)
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
        return await self._object("GET", f"/processes/{_segment(name)}/status")

    async def start(self, name: str) -> dict[str, Any]:
        """POST /processes/{name}/start: `{"status": "started", "name", "changed"}`."""
        return await self._object("POST", f"/processes/{_segment(name)}/start")

    async def stop(self, name: str) -> dict[str, Any]:
        """POST /processes/{name}/stop: `{"status": "stopped", "name", "changed"}`."""
        return await self._object("POST", f"/processes/{_segment(name)}/stop")

    async def restart(self, name: str) -> dict[str, Any]:
        """POST /processes/{name}/restart: `{"status": "restarted", "name"}`."""
        return await self._object("POST", f"/processes/{_segment(name)}/restart")

    async def inject_event(
        self,
        name: str,
        payload: dict[str, Any] | None = None,
        *,
        trigger_id: str = "remote",
        trigger_type: str = "remote",
        metadata: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """POST /processes/{name}/event: queue an event; returns `{"status": "injected", "event_id", ...}`.

        Args:
            name: the process name.
            payload: the event payload (a JSON object); None sends `{}`.
            trigger_id: the event's trigger id.
            trigger_type: the event's trigger type.
            metadata: the event metadata (a JSON object); None sends `{}`.

        Raises:
            NodeError: e.g. 404 unknown process, 400 bad body, 413 too large, 429 queue full.
        """
        body = _event_body(payload, trigger_id, trigger_type, metadata)
        return await self._object("POST", f"/processes/{_segment(name)}/event", body)

    def __repr__(self) -> str:
        token = "'***'" if self._has_token else "None"
        return f"NodeClient({self._display!r}, auth_token={token}, timeout={self._timeout})"


def _event_body(
    payload: dict[str, Any] | None, trigger_id: str, trigger_type: str, metadata: dict[str, Any] | None
) -> dict[str, Any]:
    return {
        "trigger_id": trigger_id,
        "trigger_type": trigger_type,
        "payload": {} if payload is None else payload,
        "metadata": {} if metadata is None else metadata,
    }


class CoordinatorClient:
    """An async client for a coordinator's HTTP API (SPEC 8.2), holding one connection pool.

    Its methods mirror `RuntimeCoordinator`'s, so code can steer a coordinator in process or over HTTP alike.
    Every failure names the coordinator: `CoordinatorError` (a `NodeError`) for a non-2xx answer,
    `CoordinatorUnreachableError` and `CoordinatorTimeoutError` (a `NodeUnreachableError` and a
    `NodeTimeoutError`) when no answer came. Errors a node gave the coordinator come back as the
    coordinator's answer (its status, the node's message; 502/504 when the node could not be reached).

    Args:
        url: the coordinator's http(s) base URL, e.g. `http://10.0.0.2:9000`.
        auth_token: the bearer token: the operator's for status and control, the node token for
            registering, heartbeating and unregistering.
        timeout: seconds a call may take before `CoordinatorTimeoutError` (finite, > 0).
        transport: a custom httpx transport, e.g. `httpx.ASGITransport(app)` for an app in process.

    Raises:
        ValueError: the URL, token or timeout is invalid.
    """

    __slots__ = ("_node",)

    def __init__(
        self,
        url: str,
        *,
        auth_token: str | None = None,
        timeout: float = 5.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self._node = NodeClient(url, auth_token=auth_token, timeout=timeout, transport=transport)

    @property
    def url(self) -> str:
        """The coordinator's base URL, trailing slashes stripped."""
        return self._node.url

    async def __aenter__(self) -> CoordinatorClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the connection pool."""
        await self._node.aclose()

    @contextlib.contextmanager
    def _named(self) -> Iterator[None]:
        where = self._node._display
        try:
            yield
        except NodeError as exc:
            raise CoordinatorError(exc.status_code, exc.message, exc.url, where) from exc
        except NodeTimeoutError as exc:
            raise CoordinatorTimeoutError(where, exc.reason, exc.url) from exc
        except NodeUnreachableError as exc:
            raise CoordinatorUnreachableError(where, exc.reason, exc.url) from exc

    async def request(self, method: str, path: str, json: Any = None) -> Any:
        """Send one request to the coordinator and return its decoded JSON (None for an empty 2xx body).

        Raises:
            CoordinatorError: a non-2xx answer (`.status_code`, `.message`).
            CoordinatorTimeoutError: no complete answer within `timeout`.
            CoordinatorUnreachableError: the connection was refused, reset or broken.
        """
        with self._named():
            return await self._node.request(method, path, json)

    async def _object(self, method: str, path: str, json: Any = None) -> dict[str, Any]:
        with self._named():
            return await self._node._object(method, path, json)

    async def health(self) -> dict[str, Any]:
        """GET /health: `{"status", "role": "coordinator", "node_count"}` (open even with a token)."""
        return await self._object("GET", "/health")

    async def cluster_status(self) -> dict[str, Any]:
        """GET /cluster/status: `{"total_nodes", "healthy_nodes", "unhealthy_nodes", "total_processes", "nodes"}`."""
        return await self._object("GET", "/cluster/status")

    async def nodes(self) -> list[dict[str, Any]]:
        """GET /cluster/nodes: the node table, one dict per node (`node_id`, `url`, `status`, `last_seen`, ...)."""
        nodes = (await self._object("GET", "/cluster/nodes")).get("nodes")
        return [node for node in nodes if isinstance(node, dict)] if isinstance(nodes, list) else []

    async def register_node(self, node_id: str, url: str, metadata: dict[str, Any] | None = None) -> dict[str, Any]:
        """POST /cluster/nodes: register (or refresh) a node; returns the answer, with the registry's `ttl`.

        Raises:
            ValueError: an invalid node id, URL or metadata (checked before sending).
            CoordinatorError: e.g. 401/403 (the node token is wrong), 409 (a live node holds that id at
                another URL), 422 (the coordinator refuses the URL), 503 (its registry is unavailable).
        """
        body = {
            "node_id": validate_node_id(node_id),
            "url": normalize_url(url),
            "metadata": validate_metadata(metadata),
        }
        return await self._object("POST", "/cluster/nodes", body)

    async def heartbeat(self, node_id: str) -> bool:
        """POST /cluster/nodes/{id}/heartbeat; False when the coordinator does not know the node (register again)."""
        try:
            await self._object("POST", f"/cluster/nodes/{_node_segment(node_id)}/heartbeat")
        except CoordinatorError as exc:
            if exc.status_code == 404:
                return False
            raise
        return True

    async def unregister_node(self, node_id: str) -> bool:
        """DELETE /cluster/nodes/{id}; False when the coordinator did not know the node."""
        try:
            await self._object("DELETE", f"/cluster/nodes/{_node_segment(node_id)}")
        except CoordinatorError as exc:
            if exc.status_code == 404:
                return False
            raise
        return True

    async def _control(self, node_id: str, process: str, action: str, body: Any = None) -> dict[str, Any]:
        return await self._object(
            "POST", f"/cluster/nodes/{_node_segment(node_id)}/processes/{_segment(process)}/{action}", body
        )

    async def start_process_on_node(self, node_id: str, process: str) -> dict[str, Any]:
        """Start `process` on a node through the coordinator; returns the node's answer.

        Raises:
            CoordinatorError: 404 for an unknown node or process, the node's own refusals, 502 when the node
                is unreachable and 504 when it did not answer.
        """
        return await self._control(node_id, process, "start")

    async def stop_process_on_node(self, node_id: str, process: str) -> dict[str, Any]:
        """Stop `process` on a node through the coordinator; raises like `start_process_on_node`."""
        return await self._control(node_id, process, "stop")

    async def restart_process_on_node(self, node_id: str, process: str) -> dict[str, Any]:
        """Restart `process` on a node through the coordinator; raises like `start_process_on_node`."""
        return await self._control(node_id, process, "restart")

    async def inject_event_on_node(
        self,
        node_id: str,
        process: str,
        payload: dict[str, Any] | None = None,
        *,
        trigger_id: str = "remote",
        trigger_type: str = "remote",
        metadata: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Inject an event into `process` on a node through the coordinator; returns the node's 202 answer.

        Raises:
            CoordinatorError: as `start_process_on_node`, and the node's 400, 413 and 429.
        """
        return await self._control(node_id, process, "event", _event_body(payload, trigger_id, trigger_type, metadata))

    async def broadcast_event(
        self,
        process: str,
        payload: dict[str, Any] | None = None,
        *,
        node_ids: Sequence[str] | None = None,
        trigger_type: str = "remote",
        metadata: dict[str, Any] | None = None,
    ) -> dict[str, dict[str, Any]]:
        """Inject the same event into `process` on many nodes (default: every node the coordinator knows).

        Returns:
            node id -> the node's answer, or `{"error", "status_code"}`, `{"error", "unreachable": true}` or
            `{"error", "timeout": true}`: every target answers.
        """
        body = _event_body(payload, "remote", trigger_type, metadata)
        if node_ids is not None:
            body["node_ids"] = list(node_ids)
        results = (await self._object("POST", f"/cluster/processes/{_segment(process)}/event", body)).get("results")
        return dict(results) if isinstance(results, dict) else {}

    def __repr__(self) -> str:
        return repr(self._node).replace("NodeClient(", "CoordinatorClient(", 1)


def _node_segment(node_id: str) -> str:
    return quote(validate_node_id(node_id), safe="")
