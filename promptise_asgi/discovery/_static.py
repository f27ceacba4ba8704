"""`StaticDiscovery`: a fixed topology, changed only by explicit `register`/`unregister`."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import anyio

from .._validation import normalize_url, validate_metadata, validate_node_id
from ._base import DiscoveredNode

__all__ = ["StaticDiscovery"]


class StaticDiscovery:
    """A fixed topology: the nodes you list, changed only by explicit `register`/`unregister`.

    Nodes never expire. `discover()` returns them in insertion order; registering a known node id again
    replaces its URL and metadata and keeps its place. Records are shared snapshots, as for
    `RegistryDiscovery.discover()`.

    Args:
        nodes: initial `{node_id: url}` mapping, or None for an empty topology.

    Raises:
        ValueError: a node id or URL in `nodes` is invalid (the message names which).
    """

    def __init__(self, nodes: Mapping[str, str] | None = None) -> None:
        self._nodes: dict[str, DiscoveredNode] = {}
        self._lock = anyio.Lock()
        now = time.time()
        for node_id, url in (nodes or {}).items():
            validate_node_id(node_id)
            self._nodes[node_id] = DiscoveredNode(node_id, normalize_url(url), now, {})

    async def discover(self) -> list[DiscoveredNode]:
        """Return every node, in insertion order.

        Returns:
            The current records: snapshots never changed afterwards; treat them as read-only.
        """
        async with self._lock:
            return list(self._nodes.values())

    async def register(self, node_id: str, url: str, metadata: Mapping[str, Any] | None = None) -> None:
        """Add a node, or replace a known node's URL and metadata (it keeps its place in the order).

        Args:
            node_id: the node's id.
            url: the node's http(s) base URL; trailing slashes are stripped.
            metadata: a JSON-serialisable mapping; None means empty.

        Raises:
            ValueError: the node id, URL or metadata is invalid.
        """
        record = DiscoveredNode(validate_node_id(node_id), normalize_url(url), time.time(), validate_metadata(metadata))
        async with self._lock:
            self._nodes[node_id] = record

    async def unregister(self, node_id: str) -> None:
        """Remove a node; removing an unknown node is a no-op."""
        async with self._lock:
            self._nodes.pop(node_id, None)

    def __len__(self) -> int:
        return len(self._nodes)

    def __repr__(self) -> str:
        return f"StaticDiscovery(nodes={len(self._nodes)})"
