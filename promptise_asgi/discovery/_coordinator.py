"""`CoordinatorDiscovery`: the coordinator's registry (SPEC 7.4), reached over HTTP with httpx.

A node uses it to register, heartbeat and unregister itself; anyone can use it to discover the nodes the
coordinator knows. Re-exported from `promptise_asgi.discovery`. Speaks to the coordinator through
`CoordinatorClient`, so its errors name the coordinator.
"""

from __future__ import annotations

import contextlib
import time
from types import TracebackType
from typing import Any

import httpx

from .._client import CoordinatorClient
from .._validation import check_seconds, normalize_url
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
        # How often the coordinator asks its nodes to heartbeat, learnt the same way (None until then).
        self.heartbeat_interval: float | None = None
        self._client = CoordinatorClient(
            self.coordinator_url, auth_token=auth_token, timeout=timeout, transport=transport
        )

    async def discover(self) -> list[DiscoveredNode]:
        """Return the nodes the coordinator lists.

        Raises:
            CoordinatorError: the coordinator refused (401, ...).
            CoordinatorUnreachableError: the coordinator is down (`CoordinatorTimeoutError` when it did not answer).
        """
        nodes = await self._client.nodes()
        now = time.time()
        return [
            DiscoveredNode(node["node_id"], node["url"], node.get("last_seen") or now, dict(node.get("metadata") or {}))
            for node in nodes
        ]

    async def register(self, node_id: str, url: str, metadata: dict[str, Any] | None = None) -> None:
        """Register (or refresh) a node with the coordinator.

        Raises:
            ValueError: an invalid node id, URL or metadata (checked before sending).
            CoordinatorError / CoordinatorUnreachableError: as for `discover`.
        """
        answer = await self._client.register_node(node_id, url, metadata)
        ttl = answer.get("ttl")
        if ttl is not None:
            with contextlib.suppress(ValueError):  # a coordinator that says nothing sensible keeps our default
                self.ttl = check_seconds("ttl", ttl)
        interval = answer.get("heartbeat_interval")
        if interval is not None:
            with contextlib.suppress(ValueError):
                self.heartbeat_interval = check_seconds("heartbeat_interval", interval)

    async def heartbeat(self, node_id: str, digest: dict[str, Any] | None = None) -> bool:
        """Refresh a node's registration; False when the coordinator does not know it (register again).

        Args:
            node_id: the node.
            digest: what the node runs (`{"process_count", "processes": [{"name", "state", "queue_size"}]}`):
                the coordinator then takes the node's health from its heartbeats instead of polling it.

        Raises:
            CoordinatorError: any refusal other than 404.
            CoordinatorUnreachableError: the coordinator is down.
        """
        return await self._client.heartbeat(node_id, digest)

    async def unregister(self, node_id: str) -> None:
        """Remove a node; an unknown node is a no-op."""
        await self._client.unregister_node(node_id)

    async def aclose(self) -> None:
        """Close the connection pool."""
        await self._client.aclose()

    async def __aenter__(self) -> CoordinatorDiscovery:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    @property
    def endpoints(self) -> tuple[str, ...]:
        """The coordinator's URL, as the one server this backend talks to."""
        return (self.coordinator_url,)

    @property
    def description(self) -> str:
        """The coordinator's URL, as messages name it."""
        return self.coordinator_url

    def __repr__(self) -> str:
        return f"CoordinatorDiscovery({self.coordinator_url!r})"
