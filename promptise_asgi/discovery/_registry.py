"""`RegistryDiscovery`: an in-process registry of nodes that stay listed only while they heartbeat (TTL).

Heartbeats cost the same at any size, pruning costs what expired, and `discover()` hands out the stored
records in node-id order. Runs on asyncio and trio; knows nothing of HTTP.
"""

from __future__ import annotations

import time
from bisect import bisect_left, insort
from collections import OrderedDict
from collections.abc import Callable, Mapping
from operator import attrgetter
from typing import Any

import anyio

from .._validation import check_seconds, normalize_url, validate_metadata, validate_node_id
from ._base import DiscoveredNode

__all__ = ["RegistryDiscovery"]


class _Entry:
    """One registered node's slot: mutated in place on refresh so orderings that hold it stay valid.

    `record` itself is never mutated once handed out by `discover()`: a refresh swaps in a new one.
    """

    __slots__ = ("deadline", "listed", "record")

    def __init__(self, record: DiscoveredNode, deadline: float) -> None:
        self.record = record
        self.deadline = deadline
        self.listed = True


_by_node_id = attrgetter("record.node_id")

# Up to this many queued changes are patched in one by one (bisection, a memmove each); more are applied
# with a single filter or sort pass. Measured crossover: a few hundred at 10,000-100,000 nodes.
_FEW_CHANGES = 256


class _NodeIdOrder:
    """Registry entries sorted by node id, patched lazily.

    Joins and leaves are queued and applied when the order is next read, so a small change costs a few
    bisections instead of a re-sort of the whole registry, and refreshes (which change neither) cost nothing.
    """

    __slots__ = ("_added", "_dropped", "_sorted")

    def __init__(self) -> None:
        self._sorted: list[_Entry] = []
        self._added: list[_Entry] = []
        self._dropped: list[_Entry] = []

    def add(self, entry: _Entry) -> None:
        self._added.append(entry)

    def drop(self, entry: _Entry) -> None:
        entry.listed = False
        self._dropped.append(entry)

    @property
    def pending(self) -> int:
        return len(self._added) + len(self._dropped)

    def entries(self) -> list[_Entry]:
        order = self._sorted
        if self._dropped:
            if len(self._dropped) > _FEW_CHANGES:
                order = [e for e in order if e.listed]
            else:
                for entry in self._dropped:
                    i = bisect_left(order, entry.record.node_id, key=_by_node_id)
                    # Absent when the entry joined and left between two reads: it was never merged in.
                    if i < len(order) and order[i] is entry:
                        del order[i]
            self._dropped = []
        if self._added:
            added = [e for e in self._added if e.listed]
            if len(added) > _FEW_CHANGES:
                order += added
                order.sort(key=_by_node_id)
            else:
                for entry in added:
                    insort(order, entry, key=_by_node_id)
            self._added = []
        self._sorted = order
        return order


class RegistryDiscovery:
    """An in-process registry of nodes that stay listed only while they heartbeat (a TTL, like Consul's).

    A node is live for `ttl` seconds after its last `register` or `heartbeat`, measured on the monotonic
    `clock`; `discover()` drops the ones that went quiet. `discover()` returns nodes ordered by `node_id`
    (like Consul's catalog and an etcd prefix range), so the order is stable: heartbeats and re-registrations
    never reorder the list, and switching to `EtcdDiscovery` keeps it.

    Costs: `heartbeat` and the refresh of a known node are O(1) whatever the registry size; pruning takes
    time proportional to the number of expired entries (entries are kept ordered by last refresh, which with a
    monotonic clock is also the order in which they expire); `discover()` allocates no per-node objects, as
    it hands out the stored records (a refresh replaces a node's record instead of editing it, so a list
    returned earlier never changes under its holder).

    Args:
        ttl: seconds a node stays listed without a refresh (finite, > 0).
        clock: monotonic clock in seconds; injectable so tests can move time without sleeping.

    Raises:
        ValueError: `ttl` is not a finite positive number.
    """

    def __init__(self, ttl: float = 60.0, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._ttl = check_seconds("ttl", ttl)
        self._clock = clock
        self._lock = anyio.Lock()
        # Least recently refreshed first: the front is always the next entry to expire.
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._order = _NodeIdOrder()

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
            record = DiscoveredNode(node_id, url, time.time(), meta)
            entry = self._entries.get(node_id)
            if entry is None:
                entry = self._entries[node_id] = _Entry(record, now + self._ttl)
                self._order.add(entry)
                self._bound_pending_changes()
            else:
                entry.record = record
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
                self._order.drop(entry)
                return False
            old = entry.record
            entry.record = DiscoveredNode(node_id, old.url, time.time(), old.metadata)
            entry.deadline = now + self._ttl
            self._entries.move_to_end(node_id)
            return True

    async def unregister(self, node_id: str) -> None:
        """Remove a node; removing an unknown node is a no-op."""
        async with self._lock:
            entry = self._entries.pop(node_id, None)
            if entry is not None:
                self._order.drop(entry)
                self._bound_pending_changes()

    async def discover(self) -> list[DiscoveredNode]:
        """Drop the nodes not refreshed within `ttl`, then return the live ones ordered by `node_id`.

        Returns:
            A new list of the stored records; `discovered_at` is the wall-clock time of the node's last
            refresh. The records are snapshots shared with other callers and never changed afterwards: treat
            them as read-only (`dataclasses.replace()` or `to_dict()` give a private copy).
        """
        async with self._lock:
            self._prune(self._clock())
            return [entry.record for entry in self._order.entries()]

    def _prune(self, now: float) -> None:
        entries = self._entries
        while entries:
            oldest = next(iter(entries.values()))
            if now <= oldest.deadline:
                return
            del entries[oldest.record.node_id]
            self._order.drop(oldest)

    def _bound_pending_changes(self) -> None:
        # With nobody calling discover(), queued joins and leaves of a churning registry would pile up;
        # applying them once they outnumber the live nodes keeps memory bounded at O(1) amortised cost.
        if self._order.pending > len(self._entries) + _FEW_CHANGES:
            self._order.entries()

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
