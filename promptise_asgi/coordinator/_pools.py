"""Connections the coordinator keeps to its nodes: one small httpx pool per node for control calls.

httpcore scans every connection of a pool for each request, so a single pool shared by 100 nodes costs
O(nodes^2) per round (measured: 600 ms for 100 instant nodes); one pool per node keeps a call O(1). A node
that leaves or moves has its pool (and its health probe's idle connections) closed at the next chance. Knows
httpx, `NodeClient` and the probe; nothing of the node table beyond a node's id, URL and token.
"""

from __future__ import annotations

import ssl

import httpx

from ..client import NodeClient
from ._probe import HealthProbe

__all__ = ["NodePools"]

# Requests to one node rarely overlap (a health check, a control call): a few connections are plenty.
_NODE_POOL_LIMITS = httpx.Limits(max_connections=8, max_keepalive_connections=4)


class NodePools:
    """A pool per node, opened on the first control call and closed when the node leaves.

    Args:
        ssl_context: the one CA bundle every pool uses.
        probe: the health probe, whose idle connections to a node that left are closed too.
        timeout: seconds a call may take.
        max_response_bytes: the largest answer read from a node.
    """

    def __init__(
        self, ssl_context: ssl.SSLContext, probe: HealthProbe, *, timeout: float, max_response_bytes: int
    ) -> None:
        self._ssl = ssl_context
        self._probe = probe
        self._timeout = timeout
        self._max_response_bytes = max_response_bytes
        self._pools: dict[str, tuple[tuple[str, str | None], httpx.AsyncClient]] = {}
        self._retired: list[httpx.AsyncClient] = []
        self._forgotten: list[str] = []

    def client(self, node_id: str, url: str, token: str | None) -> NodeClient:
        """A client for the node, over its pool (a new pool when its URL or token changed)."""
        key = (url, token)
        entry = self._pools.get(node_id)
        if entry is None or entry[0] != key:
            if entry is not None:
                self._retired.append(entry[1])
            pool = httpx.AsyncClient(verify=self._ssl, limits=_NODE_POOL_LIMITS)
            entry = self._pools[node_id] = (key, pool)
        return NodeClient.from_client(
            entry[1], url, auth_token=token, timeout=self._timeout, max_response_bytes=self._max_response_bytes
        )

    def retire(self, node_id: str, url: str) -> None:
        """Schedule the closing of what was kept open for a node that left (or moved)."""
        self._forgotten.append(url)
        entry = self._pools.pop(node_id, None)
        if entry is not None:
            self._retired.append(entry[1])

    async def close_retired(self) -> None:
        """Close what `retire` scheduled."""
        retired, self._retired = self._retired, []
        forgotten, self._forgotten = self._forgotten, []
        for pool in retired:
            await pool.aclose()
        for url in forgotten:
            await self._probe.forget(url)

    async def aclose(self) -> None:
        """Close every pool."""
        self._retired.extend(pool for _, pool in self._pools.values())
        self._pools.clear()
        await self.close_retired()
