"""What every discovery backend is, and what it hands out.

`ProcessDiscovery` is the Protocol every backend satisfies; optional abilities are small Protocols of their own
(`SupportsHeartbeat`, `SupportsWatch`, `ReportsWatchError`, `HasTTL`, `HasEndpoints`, `SupportsAclose`), checked with
`isinstance`.
`DiscoveredNode` and `NodeChange` are the records. Knows nothing of HTTP, Starlette or the runtime.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

__all__ = [
    "DiscoveredNode",
    "HasEndpoints",
    "HasTTL",
    "NodeChange",
    "ProcessDiscovery",
    "ReportsWatchError",
    "SupportsAclose",
    "SupportsHeartbeat",
    "SupportsWatch",
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


@runtime_checkable
class SupportsHeartbeat(Protocol):
    """A backend whose registrations expire unless refreshed (a TTL registry, a coordinator, etcd)."""

    async def heartbeat(self, node_id: str) -> bool:
        """Refresh a node; False when the backend does not know it (the node should register again)."""
        ...


@runtime_checkable
class SupportsWatch(Protocol):
    """A backend that streams joins and leaves as they happen (etcd)."""

    def watch(
        self, *, include_existing: bool = False, known: Iterable[DiscoveredNode] | None = None
    ) -> AsyncIterator[NodeChange]:
        """Yield a `NodeChange` for every join and leave, from now on (after the current nodes, if asked).

        `known` is what the caller holds already (say, its table before the watch stopped): the watch then
        starts with the differences from it, a join for each node new or changed (url or metadata) and a leave
        for each one gone, so the caller is exact again without listing the registry itself.
        """
        ...


@runtime_checkable
class ReportsWatchError(Protocol):
    """A watching backend that says when its `watch()` cannot follow the registry (etcd out of reach)."""

    @property
    def watch_error(self) -> str | None:
        """Why a running watch cannot follow the registry now; None while it does."""
        ...


@runtime_checkable
class HasTTL(Protocol):
    """A backend that expires silent nodes after `ttl` seconds (None until it is known)."""

    @property
    def ttl(self) -> float | None:
        """Seconds a node stays listed without a heartbeat."""
        ...


@runtime_checkable
class HasEndpoints(Protocol):
    """A backend reached over the network (a coordinator, etcd): the URLs it talks to."""

    @property
    def endpoints(self) -> tuple[str, ...]:
        """The servers' URLs, passwords hidden."""
        ...

    @property
    def description(self) -> str:
        """How messages name the backend: a coordinator's URL, `etcd <endpoints>`."""
        ...


@runtime_checkable
class SupportsAclose(Protocol):
    """A backend that holds resources (a connection pool) to release with `aclose()`."""

    async def aclose(self) -> None:
        """Release what the backend holds."""
        ...
