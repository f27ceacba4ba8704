"""`CoordinatorDiscovery`: the coordinator's registry (SPEC 7.4), reached over HTTP with httpx.

A node uses it to register, heartbeat and unregister itself; anyone can use it to discover the nodes the
coordinator knows. Re-exported from `promptise_asgi.discovery`. Knows the coordinator's wire API only.
"""

from __future__ import annotations

import contextlib
import time
from types import TracebackType
from typing import Any
from urllib.parse import quote

import httpx

from .._errors import NodeError
from .._validation import check_seconds, normalize_url, validate_metadata, validate_node_id
from ..client import NodeClient
from ._base import DiscoveredNode

__all__ = ["CoordinatorDiscovery"]


class CoordinatorDiscovery:
    """`ProcessDiscovery` (plus `heartbeat`) backed by a coordinator's `/cluster/nodes` API.

    Args:
        coordinator_url: the coordinator's base URL.
        auth_token: the bearer token this client sends to the coordinator.
        timeout: seconds each request may take.
        transport: a custom httpx transport (tests use `httpx.ASGITransport`).

    Raises:
        ValueError: an invalid URL, token or timeout.
    """

    def __init__(
        self,
        coordinator_url: str,
        auth_token: str | None = None,
        *,
        timeout: float = 5.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.coordinator_url = normalize_url(coordinator_url)
        # The coordinator's registry TTL, learnt from its answer to `register` (None until then).
        self.ttl: float | None = None
        self._client = NodeClient(self.coordinator_url, auth_token=auth_token, timeout=timeout, transport=transport)

    async def discover(self) -> list[DiscoveredNode]:
        """Return the nodes the coordinator lists.

        Raises:
            NodeError: the coordinator refused (401, ...).
            NodeUnreachableError: the coordinator is down (`NodeTimeoutError` when it did not answer).
        """
        answer = await self._client.request("GET", "/cluster/nodes")
        now = time.time()
        return [
            DiscoveredNode(node["node_id"], node["url"], node.get("last_seen") or now, dict(node.get("metadata") or {}))
            for node in answer.get("nodes", [])
        ]

    async def register(self, node_id: str, url: str, metadata: dict[str, Any] | None = None) -> None:
        """Register (or refresh) a node with the coordinator.

        Raises:
            ValueError: an invalid node id, URL or metadata (checked before sending).
            NodeError / NodeUnreachableError: as for `discover`.
        """
        body = {
            "node_id": validate_node_id(node_id),
            "url": normalize_url(url),
            "metadata": validate_metadata(metadata),
        }
        answer = await self._client.request("POST", "/cluster/nodes", json=body)
        ttl = answer.get("ttl") if isinstance(answer, dict) else None
        if ttl is not None:
            with contextlib.suppress(ValueError):  # a coordinator that says nothing sensible keeps our default
                self.ttl = check_seconds("ttl", ttl)

    async def heartbeat(self, node_id: str) -> bool:
        """Refresh a node's registration; False when the coordinator does not know it (register again).

        Raises:
            NodeError: any refusal other than 404.
            NodeUnreachableError: the coordinator is down.
        """
        try:
            await self._client.request("POST", f"/cluster/nodes/{_segment(node_id)}/heartbeat")
        except NodeError as exc:
            if exc.status_code == 404:
                return False
            raise
        return True

    async def unregister(self, node_id: str) -> None:
        """Remove a node; an unknown node is a no-op."""
        try:
            await self._client.request("DELETE", f"/cluster/nodes/{_segment(node_id)}")
        except NodeError as exc:
            if exc.status_code != 404:
                raise

    async def aclose(self) -> None:
        """Close the connection pool."""
        await self._client.aclose()

    async def __aenter__(self) -> CoordinatorDiscovery:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        return f"CoordinatorDiscovery({self.coordinator_url!r})"


def _segment(node_id: str) -> str:
    return quote(node_id, safe="")
