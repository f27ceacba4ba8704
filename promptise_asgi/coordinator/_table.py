"""The coordinator's node table: what it knows about each node, kept by id and in id order.

`NodeInfo` is one node's entry with the rules its health follows (a good check, a missed one, a heartbeat
digest); `NodeTable` holds the entries by id for lookups, in id order for pages (a page costs a bisection plus
its own length, whatever the table's size), and keeps the totals a status reports as verdicts change, so a
page never walks the whole table. Knows nothing of HTTP, of discovery backends or of how health is checked.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right, insort
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal

import orjson

from .._validation import NODE_ID_PATTERN, validate_node_id
from ._digest import Digest

__all__ = ["HEALTH_FILTERS", "MAX_PAGE", "NodeInfo", "NodeStatus", "NodeTable", "check_page"]

NodeStatus = Literal["unknown", "healthy", "unhealthy"]

MAX_PAGE = 1000
# What `health=` accepts: a verdict, or "missed_check" (healthy, yet its last check failed).
HEALTH_FILTERS = ("healthy", "unhealthy", "unknown", "missed_check")
_MAX_QUERY = 256


@dataclass(eq=False, slots=True)
class NodeInfo:
    """What the coordinator knows about one node.

    Attributes:
        node_id: the node's id.
        url: the node's base URL.
        metadata: what the node registered with.
        source: "registered" (by `register_node`) or "discovered" (from the discovery backend).
        status: "unknown" until the first check or digest, then "healthy" or "unhealthy".
        process_count: processes the node reported at its last successful check or heartbeat digest.
        last_seen: wall-clock time of the last successful check or heartbeat digest (None if never).
        missed_checks: consecutive failed checks; a node that misses some stays healthy until `node_timeout`.
        last_error: why the last check failed (None after a success).
        health: the node's last `/health` answer (or, from a digest, the same fields as the node reported them).
        processes: the node's processes as `[{"name", "state"}]` (plus `"queue_size"` from a digest), as last
            learned (None until then).
        last_heartbeat: wall-clock time of the last heartbeat that carried a digest (None if never).
    """

    node_id: str
    url: str
    metadata: dict[str, Any] = field(default_factory=dict)
    source: Literal["registered", "discovered"] = "registered"
    status: NodeStatus = "unknown"
    process_count: int = 0
    last_seen: float | None = None
    missed_checks: int = 0
    last_error: str | None = None
    health: dict[str, Any] | None = None
    processes: list[dict[str, Any]] | None = None
    last_heartbeat: float | None = None
    auth_token: str | None = field(default=None, repr=False)
    _last_ok: float | None = field(default=None, repr=False)  # monotonic, for node_timeout
    _digest_at: float | None = field(default=None, repr=False)  # monotonic, for a digest's freshness
    _announced: list[dict[str, str]] | None = field(default=None, repr=False)  # last `node.processes` sent
    _haystack: tuple[object, str] | None = field(default=None, repr=False)  # (metadata, its text for `q=`)

    @property
    def is_healthy(self) -> bool:
        """True when the last verdict is healthy (possibly with missed checks inside `node_timeout`)."""
        return self.status == "healthy"

    def health_fields(self) -> tuple[bool, bool, int, str]:
        """What a `node.health` change reports: healthy, missed_check, process_count, error."""
        return self.status == "healthy", self.missed_checks > 0, self.process_count, self.last_error or ""

    def digest_fresh(self, now: float, max_age: float) -> bool:
        """True when a heartbeat digest arrived less than `max_age` seconds ago (monotonic `now`)."""
        return self._digest_at is not None and now - self._digest_at < max_age

    def record_check(self, health: dict[str, Any], now: float, wall: float) -> None:
        """A good `/health` answer: healthy, its process count, no missed checks."""
        self.status = "healthy"
        self.health = health
        self.process_count = int(health.get("process_count") or 0)
        self._recovered(now, wall)

    def record_digest(self, digest: Digest, now: float, wall: float) -> None:
        """A heartbeat with a digest: the node is alive and says what it runs, as good as a check."""
        self.status = "healthy"
        if self.health is None or self.process_count != digest.process_count:
            # What `/health` would answer, so a status reads the same whichever way the node was last seen.
            self.health = {"status": "healthy", "node_id": self.node_id, "process_count": digest.process_count}
        self.process_count = digest.process_count
        self.last_heartbeat = wall
        self._digest_at = now
        self._recovered(now, wall)

    def _recovered(self, now: float, wall: float) -> None:
        self.last_seen = wall
        self._last_ok = now
        self.missed_checks = 0
        self.last_error = None

    def record_miss(self, error: str, now: float, node_timeout: float) -> bool:
        """A failed check. Inside `node_timeout` of the last good sign (a check or a digest) a healthy node stays
        healthy, flagged `missed_check`: a lost packet or a slow moment does not flap it.

        Returns:
            True when the node has just turned unhealthy.
        """
        self.missed_checks += 1
        self.last_error = error
        recently_ok = self._last_ok is not None and now - self._last_ok < node_timeout
        if self.status == "healthy" and recently_ok:
            return False
        turned = self.status != "unhealthy"
        self.status = "unhealthy"
        return turned

    def matches(self, health: str | None, query: str | None) -> bool:
        """Whether a page filtered by `health` (one of `HEALTH_FILTERS`) and `query` (casefolded) lists this node."""
        if health is not None:
            if health == "missed_check":
                if self.status != "healthy" or not self.missed_checks:
                    return False
            elif self.status != health:
                return False
        return query is None or query in self.node_id.casefold() or query in self._search_text()

    def _search_text(self) -> str:
        cached = self._haystack
        if cached is None or cached[0] is not self.metadata:  # metadata is replaced, never edited, on change
            values = (
                v if isinstance(v, str) else orjson.dumps(v, default=str).decode() for v in self.metadata.values()
            )
            cached = self._haystack = (self.metadata, "\n".join(values).casefold())
        return cached[1]

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-ready dict (never the token)."""
        entry = self.status_entry(None)
        del entry["health"]
        entry["metadata"] = dict(self.metadata)
        return entry

    def status_entry(self, health: dict[str, Any] | None) -> dict[str, Any]:
        """`to_dict()` plus `"health"`, built in one go for a status of 10,000 nodes: serialize it at once (it
        shares the node's metadata and process list rather than copying them)."""
        return {
            "node_id": self.node_id,
            "url": self.url,
            "status": self.status,
            "process_count": self.process_count,
            "processes": self.processes,
            "last_seen": self.last_seen,
            "last_heartbeat": self.last_heartbeat,
            "missed_check": self.missed_checks > 0,
            "missed_checks": self.missed_checks,
            "last_error": self.last_error,
            "source": self.source,
            "metadata": self.metadata,
            "health": health,
        }


def check_page(
    limit: object, after: object = None, health: object = None, query: object = None, *, default: int | None = None
) -> tuple[int | None, str | None, str | None, str | None]:
    """Validate a page request as it comes (query strings or Python values).

    Args:
        limit: nodes per page, from 1 to `MAX_PAGE` (an int or its digits); None means `default`.
        after: a node id: the page starts after it, in id order ("" or None: from the first node).
        health: one of `HEALTH_FILTERS`, or None.
        query: a case-insensitive substring of the id or of a metadata value, or None ("" means None).
        default: the limit when none is given (None: every node).

    Returns:
        `(limit, after, health, query)`, the query casefolded.

    Raises:
        ValueError: naming the parameter that is wrong.
    """
    if limit is None:
        checked = default
    else:
        text = str(limit) if isinstance(limit, int) and not isinstance(limit, bool) else limit
        if not isinstance(text, str) or not text.isdigit() or not 1 <= int(text) <= MAX_PAGE:
            raise ValueError(f"limit must be an integer from 1 to {MAX_PAGE}")
        checked = int(text)
    if after == "":
        after = None
    if after is not None:
        try:
            validate_node_id(after)
        except ValueError:
            raise ValueError(f"after must be a node id (matching {NODE_ID_PATTERN})") from None
    if health is not None and health not in HEALTH_FILTERS:
        raise ValueError(f"health must be one of {', '.join(HEALTH_FILTERS)}")
    if query == "":
        query = None
    if query is not None and (not isinstance(query, str) or len(query) > _MAX_QUERY):
        raise ValueError(f"q must be text of at most {_MAX_QUERY} characters")
    return checked, after, health, None if query is None else query.casefold()  # type: ignore[return-value]


class NodeTable:
    """The coordinator's nodes by id, also in id order, with the counts a cluster status reports.

    Lookups cost O(1); a join or a leave a bisection and a move of the ids after it (a memmove, microseconds at
    100,000 nodes); a page a bisection plus its length. The totals (healthy nodes, their processes) follow each
    node's verdict through `recount`, which the coordinator calls after every check or digest.
    """

    __slots__ = ("_counted", "_nodes", "_order", "healthy", "processes")

    def __init__(self) -> None:
        self._nodes: dict[str, NodeInfo] = {}
        self._order: list[str] = []
        self._counted: dict[str, tuple[bool, int]] = {}
        self.healthy = 0
        self.processes = 0

    @property
    def by_id(self) -> Mapping[str, NodeInfo]:
        """The entries by id, in the order nodes joined (read-only: change the table through its methods)."""
        return MappingProxyType(self._nodes)

    def __len__(self) -> int:
        return len(self._nodes)

    def get(self, node_id: str) -> NodeInfo | None:
        """The node's entry, or None."""
        return self._nodes.get(node_id)

    def values(self) -> list[NodeInfo]:
        """Every entry, in the order nodes joined (a list: safe to hold across awaits)."""
        return list(self._nodes.values())

    def put(self, info: NodeInfo) -> None:
        """Add an entry, or replace the entry of the same id."""
        if info.node_id not in self._nodes:
            insort(self._order, info.node_id)
        self._nodes[info.node_id] = info
        self.recount(info)

    def pop(self, node_id: str) -> NodeInfo | None:
        """Remove and return a node's entry (None when absent)."""
        info = self._nodes.pop(node_id, None)
        if info is not None:
            i = bisect_left(self._order, node_id)
            del self._order[i]
            healthy, processes = self._counted.pop(node_id)
            self.healthy -= healthy
            self.processes -= processes
        return info

    def recount(self, info: NodeInfo) -> None:
        """Count a node's current verdict in the totals, in place of what it counted for before."""
        if self._nodes.get(info.node_id) is not info:
            return
        now = (True, info.process_count) if info.status == "healthy" else (False, 0)
        before = self._counted.get(info.node_id, (False, 0))
        if now != before:
            self._counted[info.node_id] = now
            self.healthy += now[0] - before[0]
            self.processes += now[1] - before[1]
        elif info.node_id not in self._counted:
            self._counted[info.node_id] = now

    def page(
        self, *, limit: int, after: str | None = None, health: str | None = None, query: str | None = None
    ) -> tuple[list[NodeInfo], str | None]:
        """Up to `limit` nodes with ids greater than `after`, in id order, that pass the filters.

        A page without filters costs a bisection and its length; a filtered one reads ids until it is full and
        then on to the next match, so that a cursor is given only when another page holds something (a
        dashboard's `Next` never leads to an empty page).
        Taken at one instant (no await): nodes that join or leave between pages never make a node appear
        twice, and a node present from the first page to the last appears exactly once.

        Args:
            limit: the most nodes returned.
            after: the cursor: the last id of the previous page (None: start at the first node).
            health: one of `HEALTH_FILTERS`, or None.
            query: a casefolded substring of the id or of a metadata value, or None.

        Returns:
            The entries, and the cursor of the next page (None when no node that passes the filters follows this page).
        """
        order = self._order
        start = 0 if after is None else bisect_right(order, after)
        if health is None and query is None:
            ids = order[start : start + limit]
            found = [self._nodes[node_id] for node_id in ids]
            more = start + limit < len(order)
        else:
            found = []
            more = False
            nodes = self._nodes
            for i in range(start, len(order)):
                info = nodes[order[i]]
                if info.matches(health, query):
                    if len(found) == limit:
                        more = True
                        break
                    found.append(info)
        return found, (found[-1].node_id if more and found else None)
