"""Service discovery: how nodes find each other.

Holds the `ProcessDiscovery` Protocol, the `DiscoveredNode` and `NodeChange` records, and the backends that
need nothing but anyio and httpx. Runs on asyncio and trio. Knows nothing of Starlette or of the runtime.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

__all__ = [
    "DiscoveredNode",
    "NodeChange",
    "ProcessDiscovery",
]


@dataclass(slots=True)
class DiscoveredNode:
    """A node a discovery backend knows about.

    Attributes:
        node_id: the node's id (`^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$`).
        url: the node's base URL, trailing slashes stripped.
        discovered_at: wall-clock time (`time.time()`) of the last registration or heartbeat seen.
        metadata: free-form JSON object the node registered with.
    """

    node_id: str
    url: str
    discovered_at: float = field(default_factory=time.time)
    metadata: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-ready dict of this record."""
        return {
            "node_id": self.node_id,
            "url": self.url,
            "discovered_at": self.discovered_at,
            "metadata": dict(self.metadata),
        }


@dataclass(frozen=True, slots=True)
class NodeChange:
    """One change seen by a watching backend.

    Attributes:
        kind: `"join"` (registered or re-registered) or `"leave"` (unregistered or expired).
        node_id: the node that changed.
        node: the node as it now is, or None on leave.
    """

    kind: Literal["join", "leave"]
    node_id: str
    node: DiscoveredNode | None = None


@runtime_checkable
class ProcessDiscovery(Protocol):
    """What every discovery backend offers."""

    async def discover(self) -> list[DiscoveredNode]:
        """Return the nodes currently known (expired entries pruned first)."""
        ...

    async def register(self, node_id: str, url: str, metadata: dict[str, Any] | None = None) -> None:
        """Add or refresh a node; new metadata replaces the old."""
        ...

    async def unregister(self, node_id: str) -> None:
        """Remove a node; removing an unknown node is a no-op."""
        ...
