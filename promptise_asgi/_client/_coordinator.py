"""`CoordinatorClient`: the async client for a coordinator's HTTP API (SPEC 8.2), with errors that name it.

Built on a `NodeClient` (one pool, the same request machinery); every failure is renamed as the coordinator's.
Knows the coordinator's URL layout only.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from types import TracebackType
from typing import Any
from urllib.parse import quote, urlencode

import httpx

from .._errors import (
    CoordinatorError,
    CoordinatorTimeoutError,
    CoordinatorUnreachableError,
    NodeError,
    NodeTimeoutError,
    NodeUnreachableError,
)
from .._validation import normalize_url, validate_metadata, validate_node_id
from ._node import NodeClient, event_body, path_segment
from ._stream import ChangeStream

__all__ = ["CoordinatorClient"]


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

    async def cluster_status(self, *, limit: int | None = None, after: str | None = None) -> dict[str, Any]:
        """GET /cluster/status: `{"total_nodes", "healthy_nodes", "unhealthy_nodes", "total_processes", "nodes"}`.

        Args:
            limit: list at most this many nodes (1 to 1,000), in id order, and say where the next page starts
                (`"next"`); None lists every node. The totals always count every node.
            after: with `limit`, the previous page's `next`.
        """
        return await self._object("GET", "/cluster/status" + _query(limit=limit, after=after))

    async def node_page(
        self, *, limit: int | None = None, after: str | None = None, health: str | None = None, q: str | None = None
    ) -> dict[str, Any]:
        """GET /cluster/nodes with paging and filters: `{"nodes", "count", "total", "next"}`.

        Args:
            limit: nodes per page (1 to 1,000; the coordinator's default is 100).
            after: the previous page's `next`.
            health: `healthy`, `unhealthy`, `unknown` or `missed_check`.
            q: a case-insensitive substring of the node id or of a metadata value.
        """
        return await self._object("GET", "/cluster/nodes" + _query(limit=limit, after=after, health=health, q=q))

    async def nodes(self) -> list[dict[str, Any]]:
        """GET /cluster/nodes, page after page: the whole node table, one dict per node (`node_id`, `url`,
        `status`, `last_seen`, ...), in id order."""
        listed: list[dict[str, Any]] = []
        after: str | None = None
        while True:
            page = await self.node_page(limit=_PAGE, after=after)
            nodes = page.get("nodes")
            listed += [node for node in nodes if isinstance(node, dict)] if isinstance(nodes, list) else []
            following = page.get("next")
            # A coordinator that does not page lists everything at once, with no `next`.
            if not isinstance(following, str) or following == after:
                return listed
            after = following

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

    async def heartbeat(self, node_id: str, digest: dict[str, Any] | None = None) -> bool:
        """POST /cluster/nodes/{id}/heartbeat; False when the coordinator does not know the node (register again).

        Args:
            node_id: the node.
            digest: what the node runs, `{"process_count": N, "processes": [{"name", "state", "queue_size"}]}`:
                the coordinator then takes the node's health from its heartbeats instead of polling it.

        Raises:
            CoordinatorError: e.g. 413 (a digest over the coordinator's limit), 422 (a malformed digest).
        """
        try:
            await self._object("POST", f"/cluster/nodes/{_node_segment(node_id)}/heartbeat", digest)
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
            "POST", f"/cluster/nodes/{_node_segment(node_id)}/processes/{path_segment(process)}/{action}", body
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
        return await self._control(node_id, process, "event", event_body(payload, trigger_id, trigger_type, metadata))

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
        body = event_body(payload, "remote", trigger_type, metadata)
        if node_ids is not None:
            body["node_ids"] = list(node_ids)
        results = (await self._object("POST", f"/cluster/processes/{path_segment(process)}/event", body)).get("results")
        return dict(results) if isinstance(results, dict) else {}

    def changes(self, *, last_event_id: int | None = None) -> ChangeStream:
        """GET /cluster/changes: the cluster's changes as they happen, reconnecting and resuming by id.

        A `snapshot` (the cluster status) first unless `last_event_id` can be resumed from, then
        `node.joined`, `node.left`, `node.health` and `node.processes`.

        Raises:
            CoordinatorError: (while iterating) the coordinator refused the stream for good (401, 403, 404).
        """
        node, where = self._node, self._node._display

        def refused(status: int, message: str, url: str) -> Exception:
            return CoordinatorError(status, message, url, where)

        return ChangeStream(
            node._client,
            node.url + "/cluster/changes",
            headers=node._headers,
            last_event_id=last_event_id,
            refused=refused,
        )

    def __repr__(self) -> str:
        return repr(self._node).replace("NodeClient(", "CoordinatorClient(", 1)


def _node_segment(node_id: str) -> str:
    return quote(validate_node_id(node_id), safe="")


_PAGE = 1000  # the largest page a coordinator gives: the fewest requests for a whole table


def _query(**params: object) -> str:
    given = {key: value for key, value in params.items() if value is not None}
    return "?" + urlencode(given) if given else ""
