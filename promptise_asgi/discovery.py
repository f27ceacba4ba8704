"""Service discovery: how nodes find each other.

Holds the `ProcessDiscovery` Protocol, the `DiscoveredNode` and `NodeChange` records, and the backends that
need nothing but anyio and httpx: `StaticDiscovery` (a fixed topology) and `RegistryDiscovery` (an in-process
TTL registry). Runs on asyncio and trio. Knows nothing of Starlette or of the runtime.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from operator import attrgetter
from typing import Any, Literal, Protocol, runtime_checkable

import anyio

from promptise_asgi._validation import normalize_url, validate_metadata, validate_node_id

__all__ = [
    "DiscoveredNode",
    "NodeChange",
    "ProcessDiscovery",
    "RegistryDiscovery",
    "StaticDiscovery",
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


def _snapshot(node_id: str, url: str, discovered_at: float, metadata: dict[str, Any]) -> DiscoveredNode:
    # A fresh record with its own top-level metadata dict, so a caller editing what discover() returned
    # cannot change the registry behind its back.
    return DiscoveredNode(node_id, url, discovered_at, metadata.copy())


class StaticDiscovery:
    """A fixed topology: the nodes you list, changed only by explicit `register`/`unregister`.

    Nodes never expire. `discover()` returns them in insertion order; registering a known node id again
    replaces its URL and metadata and keeps its place.

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
            Fresh `DiscoveredNode` records (editing them does not change the topology).
        """
        async with self._lock:
            return [_snapshot(n.node_id, n.url, n.discovered_at, n.metadata) for n in self._nodes.values()]

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


class _Entry:
    """One registered node: mutated in place on refresh so cached orderings stay valid."""

    __slots__ = ("deadline", "discovered_at", "metadata", "node_id", "url")

    def __init__(self, node_id: str, url: str, metadata: dict[str, Any], discovered_at: float, deadline: float) -> None:
        self.node_id = node_id
        self.url = url
        self.metadata = metadata
        self.discovered_at = discovered_at
        self.deadline = deadline


_by_node_id = attrgetter("node_id")


class RegistryDiscovery:
    """An in-process registry of nodes that stay listed only while they heartbeat (a TTL, like Consul's).

    A node is live for `ttl` seconds after its last `register` or `heartbeat`, measured on the monotonic
    `clock`; `discover()` drops the ones that went quiet. `discover()` returns nodes ordered by `node_id`
    (like Consul's catalog and an etcd prefix range), so the order is stable: heartbeats and re-registrations
    never reorder the list, and switching to `EtcdDiscovery` keeps it.

    Costs: `heartbeat` and the refresh of a known node are O(1) whatever the registry size; pruning takes
    time proportional to the number of expired entries (entries are kept ordered by last refresh, which with a
    monotonic clock is also the order in which they expire).

    Args:
        ttl: seconds a node stays listed without a refresh (finite, > 0).
        clock: monotonic clock in seconds; injectable so tests can move time without sleeping.

    Raises:
        ValueError: `ttl` is not a finite positive number.
    """

    def __init__(self, ttl: float = 60.0, *, clock: Callable[[], float] = time.monotonic) -> None:
        if isinstance(ttl, bool) or not isinstance(ttl, int | float) or not math.isfinite(ttl) or ttl <= 0:
            raise ValueError(f"ttl must be a finite number of seconds > 0, got {ttl!r}")
        self._ttl = float(ttl)
        self._clock = clock
        self._lock = anyio.Lock()
        # Least recently refreshed first: the front is always the next entry to expire.
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        # Entries sorted by node_id, rebuilt only when membership changes (never on a refresh).
        self._sorted: list[_Entry] | None = None

    @property
    def ttl(self) -> float:
        """Seconds a node stays listed without a refresh."""
        return self._ttl

    async def register(self, node_id: str, url: str, metadata: Mapping[str, Any] | None = None) -> None:
        """Add a node, or refresh a known one (new URL and metadata replace the old ones).

        Args:
            node_id: the node's id.
            url: the node's http(s) base URL; trailing slashes are stripped.
            metadata: a JSON-serialisable mapping; None means empty.

        Raises:
            ValueError: the node id, URL or metadata is invalid.
        """
        validate_node_id(node_id)
        url = normalize_url(url)
        meta = validate_metadata(metadata)
        async with self._lock:
            now = self._clock()
            self._prune(now)
            entry = self._entries.get(node_id)
            if entry is None:
                self._entries[node_id] = _Entry(node_id, url, meta, time.time(), now + self._ttl)
                self._sorted = None
            else:
                entry.url = url
                entry.metadata = meta
                entry.discovered_at = time.time()
                entry.deadline = now + self._ttl
                self._entries.move_to_end(node_id)

    async def heartbeat(self, node_id: str) -> bool:
        """Refresh a node's TTL.

        Args:
            node_id: the node's id.

        Returns:
            True if the node was refreshed; False if it is unknown or had already expired, in which case it is
            dropped and the caller should `register` again.
        """
        async with self._lock:
            entry = self._entries.get(node_id)
            if entry is None:
                return False
            now = self._clock()
            if now > entry.deadline:
                del self._entries[node_id]
                self._sorted = None
                return False
            entry.discovered_at = time.time()
            entry.deadline = now + self._ttl
            self._entries.move_to_end(node_id)
            return True

    async def unregister(self, node_id: str) -> None:
        """Remove a node; removing an unknown node is a no-op."""
        async with self._lock:
            if self._entries.pop(node_id, None) is not None:
                self._sorted = None

    async def discover(self) -> list[DiscoveredNode]:
        """Drop the nodes not refreshed within `ttl`, then return the live ones ordered by `node_id`.

        Returns:
            Fresh `DiscoveredNode` records; `discovered_at` is the wall-clock time of the node's last refresh.
        """
        async with self._lock:
            self._prune(self._clock())
            if self._sorted is None:
                self._sorted = sorted(self._entries.values(), key=_by_node_id)
            return [_snapshot(e.node_id, e.url, e.discovered_at, e.metadata) for e in self._sorted]

    def _prune(self, now: float) -> None:
        entries = self._entries
        while entries:
            oldest = next(iter(entries.values()))
            if now <= oldest.deadline:
                return
            del entries[oldest.node_id]
            self._sorted = None

    def __len__(self) -> int:
        """Number of live nodes (an expired node no longer counts, even before it is pruned)."""
        now = self._clock()
        expired = 0
        for entry in self._entries.values():
            if now <= entry.deadline:
                break
            expired += 1
        return len(self._entries) - expired

    def __repr__(self) -> str:
        return f"RegistryDiscovery(nodes={len(self)}, ttl={self._ttl}s)"
