"""`RuntimeCoordinator`: one view of every node's health, and remote control of their processes.

It keeps a node table fed by registrations and by any `ProcessDiscovery` backend, checks health concurrently
(bounded, each check with its own timeout, damped against flapping), and steers processes on nodes through
`NodeClient`, one small pool per node. Runs on asyncio and trio. Knows nodes only through their HTTP API, and
serves no HTTP itself (`_app` does).
"""

from __future__ import annotations

import logging
import ssl
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType, TracebackType
from typing import Any, Literal, TypeVar

import anyio
import httpx
from anyio.abc import TaskGroup

from .._changes import ChangeHub, Subscription
from .._errors import (
    ClusterFullError,
    DiscoveryUnavailableError,
    NodeConflictError,
    NodeError,
    NodeTimeoutError,
    NodeUnreachableError,
)
from .._validation import (
    NodeAddressRules,
    check_count,
    check_seconds,
    clean_token,
    derive_idempotency_key,
    metadata_size,
    validate_metadata,
    validate_node_id,
)
from ..client import NodeClient
from ..discovery import HasTTL, ProcessDiscovery, SupportsHeartbeat
from ._probe import HealthProbe

__all__ = ["NodeInfo", "RuntimeCoordinator"]

logger = logging.getLogger("promptise_asgi.coordinator")

NodeStatus = Literal["unknown", "healthy", "unhealthy"]
T = TypeVar("T")

# Requests to one node rarely overlap (a health check, a control call): a few connections are plenty.
_NODE_POOL_LIMITS = httpx.Limits(max_connections=8, max_keepalive_connections=4)

DEFAULT_MAX_NODES = 100_000
DEFAULT_MAX_METADATA_BYTES = 16 * 1024
DEFAULT_MAX_RESPONSE_BYTES = 8 * 1024 * 1024


@dataclass(eq=False)
class NodeInfo:
    """What the coordinator knows about one node.

    Attributes:
        node_id: the node's id.
        url: the node's base URL.
        metadata: what the node registered with.
        source: "registered" (by `register_node`) or "discovered" (from the discovery backend).
        status: "unknown" until the first check, then "healthy" or "unhealthy".
        process_count: processes the node reported at its last successful check.
        last_seen: wall-clock time of the last successful check (None if never).
        missed_checks: consecutive failed checks; a node that misses some stays healthy until `node_timeout`.
        last_error: why the last check failed (None after a success).
        health: the node's last `/health` answer.
        processes: the node's processes as `[{"name", "state"}]`, as last learned (None until then).
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
    processes: list[dict[str, str]] | None = None
    auth_token: str | None = field(default=None, repr=False)
    _last_ok: float | None = field(default=None, repr=False)  # monotonic, for node_timeout

    @property
    def is_healthy(self) -> bool:
        """True when the last verdict is healthy (possibly with missed checks inside `node_timeout`)."""
        return self.status == "healthy"

    def health_fields(self) -> tuple[bool, bool, int, str]:
        """What a `node.health` change reports: healthy, missed_check, process_count, error."""
        return self.status == "healthy", self.missed_checks > 0, self.process_count, self.last_error or ""

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-ready dict (never the token)."""
        return {
            "node_id": self.node_id,
            "url": self.url,
            "status": self.status,
            "process_count": self.process_count,
            "last_seen": self.last_seen,
            "missed_check": self.missed_checks > 0,
            "missed_checks": self.missed_checks,
            "last_error": self.last_error,
            "source": self.source,
            "metadata": dict(self.metadata),
        }


class _BackendHealth:
    """Whether the discovery backend answered last time, and since when it has not (for status)."""

    __slots__ = ("error", "since")

    def __init__(self) -> None:
        self.error: str | None = None
        self.since: float | None = None

    def ok(self) -> None:
        if self.error is not None:
            logger.warning("discovery backend answers again (it failed for %.1fs)", time.time() - (self.since or 0))
        self.error = self.since = None

    def failed(self, reason: str) -> None:
        if self.error is None:
            logger.warning("discovery backend unavailable, answering from the last known nodes: %s", reason)
            self.since = time.time()
        self.error = reason

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.error is None, "error": self.error, "since": self.since}


class RuntimeCoordinator:
    """Tracks a cluster's nodes and steers their processes.

    `async with RuntimeCoordinator(...) as coordinator:` runs the health monitor (a check every
    `health_check_interval` seconds) and closes the connection pool on exit. Every call also works outside
    `async with` on a coordinator that was never entered.

    Args:
        discovery: a `ProcessDiscovery` backend whose nodes join the table (and leave it when they expire).
        health_check_interval: seconds between background health checks.
        node_timeout: seconds a node that stops answering stays healthy (marked `missed_check`) before it is
            declared unhealthy; damps flapping on a lost packet or a slow moment.
        request_timeout: seconds any single request to a node may take; one slow node never delays the rest
            by more than this.
        auth_token: the bearer token sent to nodes (a node registered with its own token uses that one). The
            coordinator app also requires it from nodes that register, heartbeat or unregister over HTTP.
        max_concurrency: the most requests in flight at once (health checks, broadcasts).
        node_networks: CIDRs node URLs must fall in (`["10.0.0.0/8"]`); empty allows any address but
            link-local and cloud metadata ones, which are never called.
        max_nodes: the most nodes the table holds; a new node beyond it is refused (`ClusterFullError`).
        max_metadata_bytes: the largest registration metadata, serialized as JSON (`MetadataTooLargeError`).
        max_response_bytes: the largest answer read from a node (`NodeResponseTooLargeError` beyond).
        discovery_timeout: seconds a call to the discovery backend may take before the coordinator answers
            from its table (status) or refuses (registration, `DiscoveryUnavailableError`).
        clock: monotonic clock used for `node_timeout` (injectable for tests).

    Raises:
        ValueError: a non-positive interval, timeout, cap or concurrency, a bad network, or a blank token.
    """

    def __init__(
        self,
        *,
        discovery: ProcessDiscovery | None = None,
        health_check_interval: float = 15.0,
        node_timeout: float = 45.0,
        request_timeout: float = 5.0,
        auth_token: str | None = None,
        max_concurrency: int = 128,
        node_networks: Iterable[str] = (),
        max_nodes: int = DEFAULT_MAX_NODES,
        max_metadata_bytes: int = DEFAULT_MAX_METADATA_BYTES,
        max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES,
        discovery_timeout: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.health_check_interval = check_seconds("health_check_interval", health_check_interval)
        self.node_timeout = check_seconds("node_timeout", node_timeout)
        self.request_timeout = check_seconds("request_timeout", request_timeout)
        self.discovery_timeout = check_seconds("discovery_timeout", discovery_timeout)
        self.max_concurrency = check_count("max_concurrency", max_concurrency)
        self.max_nodes = check_count("max_nodes", max_nodes)
        self.max_metadata_bytes = check_count("max_metadata_bytes", max_metadata_bytes)
        self.max_response_bytes = check_count("max_response_bytes", max_response_bytes)
        self.discovery = discovery
        self.address_rules = NodeAddressRules(node_networks)
        self._discovery_health = _BackendHealth()
        self._auth_token = None if auth_token is None else clean_token(auth_token)
        self._clock = clock
        self._nodes: dict[str, NodeInfo] = {}
        self._limiter = anyio.CapacityLimiter(max_concurrency)
        # One small connection pool per node: httpcore scans every connection of a pool for each request, so a
        # single pool shared by 100 nodes costs O(nodes^2) per round (measured: 600 ms for 100 instant nodes).
        self._pools: dict[str, tuple[tuple[str, str | None], httpx.AsyncClient]] = {}
        self._retired: list[httpx.AsyncClient] = []
        self._forgotten: list[str] = []
        self._ssl = ssl.create_default_context()  # one CA bundle for every pool and probe, not one per node
        self._probe = HealthProbe(timeout=self.request_timeout, ssl_context=self._ssl)
        self._monitor: TaskGroup | None = None
        self._skipped: dict[str, str] = {}  # discovered entries refused, by id (to log each one once)
        self._changes = ChangeHub(self.table_status)

    # -- node table -----------------------------------------------------------------------------------------

    @property
    def nodes(self) -> Mapping[str, NodeInfo]:
        """A read-only view of the node table by id."""
        return MappingProxyType(self._nodes)

    @property
    def node_token(self) -> str | None:
        """The token sent to nodes, which nodes must also present to register over HTTP (None when unset)."""
        return self._auth_token

    def register_node(
        self, node_id: str, url: str, metadata: Mapping[str, Any] | None = None, *, auth_token: str | None = None
    ) -> NodeInfo:
        """Add a node to the table, or update a known one (a new URL resets its health to unknown).

        This is the operator's in-process call and may replace any entry; nodes registering themselves over
        HTTP go through `accept_registration`, which never displaces a live node. A node registered here with
        its own `auth_token` is never replaced over HTTP.

        Raises:
            ValueError: invalid node id, URL (see `NodeAddressRules`), metadata or token.
            MetadataTooLargeError: metadata over `max_metadata_bytes`.
            ClusterFullError: a new node while the table holds `max_nodes`.
        """
        validate_node_id(node_id)
        url = self.address_rules.check_url(url)
        meta = self._checked_metadata(metadata)
        if auth_token is not None:
            auth_token = clean_token(auth_token)
        self._check_room(node_id)
        return self._upsert(node_id, url, meta, "registered", auth_token)

    async def accept_registration(
        self, node_id: str, url: str, metadata: Mapping[str, Any] | None = None
    ) -> dict[str, Any]:
        """A node's own registration (`POST /cluster/nodes`): checked, never displacing a live node.

        A known node id may move to another URL only when its registered URL fails a health check right now
        (or answers as another node): a live node cannot be displaced, and a node registered in process with
        its own token never is. With a discovery backend, the registration is written there first (so its
        TTL applies) and the table follows at once, without re-reading the backend.

        Returns:
            The registration's answer: `{"status": "registered", "node_id", "url"}` plus the backend's `ttl`.

        Raises:
            ValueError: invalid node id, URL or metadata, or a host name that does not resolve to an
                address the coordinator may call.
            MetadataTooLargeError: metadata over `max_metadata_bytes`.
            NodeConflictError: the node id is registered, and alive, at another URL.
            ClusterFullError: a new node while the table holds `max_nodes`.
            DiscoveryUnavailableError: the discovery backend failed or did not answer in time.
        """
        validate_node_id(node_id)
        url = self.address_rules.check_url(url)
        meta = self._checked_metadata(metadata)
        await self.address_rules.check_resolved(url)
        existing = self._nodes.get(node_id)
        if (
            existing is not None
            and existing.url != url
            and (existing.auth_token is not None or await self._answers_as(existing))
        ):
            raise NodeConflictError(node_id)
        self._check_room(node_id)
        answer: dict[str, Any] = {"status": "registered", "node_id": node_id, "url": url}
        discovery = self.discovery
        if discovery is None:
            self._upsert(node_id, url, meta, "registered")
            return answer
        await self._call_discovery(discovery.register(node_id, url, meta))
        existing = self._nodes.get(node_id)
        self._upsert(node_id, url, meta, existing.source if existing is not None else "discovered")
        if isinstance(discovery, HasTTL) and discovery.ttl is not None:
            answer["ttl"] = discovery.ttl
        return answer

    async def accept_heartbeat(self, node_id: str) -> bool:
        """A node's heartbeat: False when the registry does not know it (the node then registers again).

        Raises:
            DiscoveryUnavailableError: the discovery backend failed or did not answer in time.
        """
        if not isinstance(self.discovery, SupportsHeartbeat):
            return node_id in self._nodes
        known: bool = await self._call_discovery(self.discovery.heartbeat(node_id))
        return known

    async def accept_unregistration(self, node_id: str) -> bool:
        """A node leaving (`DELETE /cluster/nodes/{id}`); False when the table did not know it.

        Raises:
            DiscoveryUnavailableError: the discovery backend failed or did not answer in time.
        """
        if self.discovery is not None:
            await self._call_discovery(self.discovery.unregister(node_id))
        info = self._nodes.pop(node_id, None)
        if info is None:
            return False
        self._retire(node_id, info.url)
        self._changes.publish("node.left", {"node_id": node_id, "reason": "unregistered"})
        return True

    def unregister_node(self, node_id: str) -> None:
        """Remove a node from the table.

        Raises:
            KeyError: the node is not registered.
        """
        info = self.get_node(node_id)
        del self._nodes[node_id]
        self._retire(node_id, info.url)
        self._changes.publish("node.left", {"node_id": node_id, "reason": "unregistered"})

    def get_node(self, node_id: str) -> NodeInfo:
        """Return a node's info.

        Raises:
            KeyError: `Node 'x' not registered`.
        """
        try:
            return self._nodes[node_id]
        except KeyError:
            raise KeyError(f"Node '{node_id}' not registered") from None

    @property
    def healthy_nodes(self) -> list[str]:
        """Ids of the nodes whose last verdict is healthy."""
        return [node_id for node_id, info in self._nodes.items() if info.is_healthy]

    def _checked_metadata(self, metadata: Mapping[str, Any] | None) -> dict[str, Any]:
        meta = validate_metadata(metadata)
        metadata_size(meta, self.max_metadata_bytes)
        return meta

    def _check_room(self, node_id: str) -> None:
        if node_id not in self._nodes and len(self._nodes) >= self.max_nodes:
            raise ClusterFullError(self.max_nodes)

    async def _answers_as(self, info: NodeInfo) -> bool:
        """True when `info.url` answers `/health` now as node `info.node_id` (a live node, not a moved one)."""
        try:
            health = await self._probe.health(info.url, info.auth_token or self._auth_token)
        except Exception:
            return False
        return bool(health.get("node_id", info.node_id) == info.node_id)

    async def _call_discovery(self, call: Awaitable[T]) -> T:
        """Await a discovery backend call within `discovery_timeout`, reporting failures as unavailability."""
        try:
            with anyio.fail_after(self.discovery_timeout):
                result = await call
        except TimeoutError:
            reason = f"no answer within {self.discovery_timeout:g}s"
        except Exception as exc:
            reason = str(exc) or type(exc).__name__
        else:
            self._discovery_health.ok()
            return result
        self._discovery_health.failed(reason)
        raise DiscoveryUnavailableError(reason)

    def _upsert(
        self,
        node_id: str,
        url: str,
        metadata: dict[str, Any],
        source: Literal["registered", "discovered"],
        auth_token: str | None = None,
    ) -> NodeInfo:
        """Write an already validated entry (its URL normalised, its metadata a fresh dict)."""
        info = self._nodes.get(node_id)
        if info is not None and info.url != url:
            self._retire(node_id, info.url)
        if info is None or info.url != url:
            info = NodeInfo(node_id, url, metadata, source, auth_token=auth_token)
            self._nodes[node_id] = info
            self._changes.publish("node.joined", {"node_id": node_id, "url": url, "metadata": dict(metadata)})
        else:
            info.metadata = metadata
            info.source = source if info.source == "discovered" else info.source
            if auth_token is not None:
                info.auth_token = auth_token
        return info

    async def sync_discovery(self) -> None:
        """Pull the discovery backend's nodes into the table; drop discovered nodes it no longer lists.

        A backend that fails, or does not answer within `discovery_timeout`, leaves the table as it was and
        is reported in `cluster_status()["discovery"]`. Entries the coordinator would refuse from a
        registration (a bad URL, oversized metadata, beyond `max_nodes`) are skipped with a log line.
        """
        if self.discovery is None:
            return
        try:
            discovered = await self._call_discovery(self.discovery.discover())
        except DiscoveryUnavailableError:
            return
        seen = set()
        for node in discovered:
            seen.add(node.node_id)
            existing = self._nodes.get(node.node_id)
            if existing is not None and (
                existing.source == "registered"  # an explicit registration wins over what discovery says
                or (existing.url == node.url and existing.metadata == node.metadata)
            ):
                continue
            try:
                validate_node_id(node.node_id)
                url = self.address_rules.check_url(node.url)
                meta = self._checked_metadata(node.metadata)
                self._check_room(node.node_id)
            except (ValueError, ClusterFullError) as exc:
                if self._skipped.get(node.node_id) != node.url:
                    logger.warning("discovery lists node %r, which is not accepted: %s", node.node_id, exc)
                    self._skipped[node.node_id] = node.url
                continue
            self._upsert(node.node_id, url, meta, "discovered")
        for node_id in [n for n, info in self._nodes.items() if info.source == "discovered" and n not in seen]:
            self._retire(node_id, self._nodes.pop(node_id).url)
            self._changes.publish("node.left", {"node_id": node_id, "reason": "expired"})
        if len(self._skipped) > len(seen):
            self._skipped = {n: u for n, u in self._skipped.items() if n in seen}
        await self._close_retired()

    # -- health -------------------------------------------------------------------------------------------

    async def check_health(self, *, processes: bool = False) -> dict[str, dict[str, Any]]:
        """Check every node at once (bounded by `max_concurrency`, each within `request_timeout`).

        Args:
            processes: also read each healthy node's `/processes`, for `node.processes` changes (the monitor's
                rounds do; an on-demand status does not need to).

        Returns:
            node id -> the node's `/health` answer, or `{"status": "unhealthy", "error": ...}`.
        """
        await self.sync_discovery()
        await self._close_retired()
        results: dict[str, dict[str, Any]] = {}
        targets = list(self._nodes.values())
        async with anyio.create_task_group() as tg:
            for info in targets:
                tg.start_soon(self._check_one, info, results, processes)
        return results

    async def _check_one(self, info: NodeInfo, results: dict[str, dict[str, Any]], processes: bool = False) -> None:
        before = info.health_fields()
        token = info.auth_token or self._auth_token
        try:
            async with self._limiter:
                health = await self._probe.health(info.url, token)
        except Exception as exc:  # whatever one node does, the round (and status) goes on
            if not isinstance(exc, NodeError | NodeUnreachableError):
                logger.exception("health check of node %s failed unexpectedly", info.node_id)
            self._record_failure(info, exc)
            results[info.node_id] = {"status": "unhealthy", "error": f"Health check failed: {exc}"}
        else:
            info.status = "healthy"
            info.health = health
            info.process_count = int(health.get("process_count") or 0)
            info.last_seen = time.time()
            info._last_ok = self._clock()
            info.missed_checks = 0
            info.last_error = None
            results[info.node_id] = health
            if processes:
                await self._learn_processes(info, token)
        self._health_changed(info, before)

    async def _learn_processes(self, info: NodeInfo, token: str | None) -> None:
        try:
            async with self._limiter:
                answer = await self._probe.get(info.url, "/processes", token)
        except Exception:  # the health verdict stands; the process list is learned next time
            return
        listed = answer.get("processes")
        if isinstance(listed, list):
            self.note_processes(info.node_id, listed)

    def note_processes(self, node_id: str, processes: list[Any]) -> None:
        """Record what a node runs (from a check or a heartbeat digest) and announce a change of it."""
        info = self._nodes.get(node_id)
        if info is None:
            return
        current = [{"name": str(p.get("name")), "state": str(p.get("state"))} for p in processes if isinstance(p, dict)]
        if current != info.processes:
            info.processes = current
            self._changes.publish("node.processes", {"node_id": node_id, "processes": current})

    def _health_changed(self, info: NodeInfo, before: tuple[bool, bool, int, str]) -> None:
        after = info.health_fields()
        if after != before and info.node_id in self._nodes:
            healthy, missed, count, error = after
            self._changes.publish(
                "node.health",
                {"node_id": info.node_id, "healthy": healthy, "missed_check": missed, "process_count": count,
                 "error": error},
            )  # fmt: skip

    def _record_failure(self, info: NodeInfo, exc: Exception) -> None:
        info.missed_checks += 1
        info.last_error = str(exc)
        recently_ok = info._last_ok is not None and self._clock() - info._last_ok < self.node_timeout
        if info.status == "healthy" and recently_ok:
            return  # damped: a missed check inside node_timeout keeps the node healthy, flagged missed_check
        if info.status != "unhealthy":
            logger.warning("node %s is unhealthy: %s", info.node_id, exc)
        info.status = "unhealthy"

    async def cluster_status(self) -> dict[str, Any]:
        """Check every node now and summarise the cluster.

        Returns:
            `{"total_nodes", "healthy_nodes", "unhealthy_nodes", "total_processes", "nodes": {id: {...}}}`,
            each node entry being `NodeInfo.to_dict()` plus its `"health"` answer or error; with a discovery
            backend also `"discovery": {"ok", "error", "since"}` (`since`: when it started failing).
        """
        results = await self.check_health()
        return self._summary({node_id: results.get(node_id) for node_id in self._nodes})

    def table_status(self) -> dict[str, Any]:
        """The cluster as the table knows it now, without checking anything (what a change stream's snapshot
        holds); each node's `"health"` is its last `/health` answer."""
        return self._summary({node_id: info.health for node_id, info in self._nodes.items()})

    def _summary(self, health: dict[str, dict[str, Any] | None]) -> dict[str, Any]:
        nodes = {node_id: {**info.to_dict(), "health": health.get(node_id)} for node_id, info in self._nodes.items()}
        healthy = [info for info in self._nodes.values() if info.is_healthy]
        status: dict[str, Any] = {
            "total_nodes": len(nodes),
            "healthy_nodes": len(healthy),
            "unhealthy_nodes": len(nodes) - len(healthy),
            "total_processes": sum(info.process_count for info in healthy),
            "nodes": nodes,
        }
        if self.discovery is not None:
            status["discovery"] = self._discovery_health.to_dict()
        return status

    # -- change stream -------------------------------------------------------------------------------------

    @property
    def change_hub(self) -> ChangeHub:
        """The hub the coordinator's changes are published to (`/cluster/changes` reads it)."""
        return self._changes

    def changes(self, *, last_event_id: int | None = None) -> Subscription:
        """The cluster's changes as they happen, in process: a snapshot first (unless `last_event_id` can be
        resumed from), then `node.joined`, `node.left`, `node.health` and `node.processes`.

        Example::

            async with coordinator.changes() as changes:
                while True:
                    change = await changes.receive()

        A reader that falls 1,024 changes behind is cut off (`receive()` raises `anyio.EndOfStream` and
        `.lagged` is true): subscribe again with the last id received.
        """
        return self._changes.subscribe(last_event_id)

    # -- remote control -------------------------------------------------------------------------------------

    async def node_request(self, node_id: str, method: str, path: str) -> Any:
        """Send one request to a node's API (a path below its URL, already percent-encoded) and return its JSON.

        What the dashboard reads through the coordinator: a node's `/status`, its dead letters.

        Raises:
            KeyError: unknown node.
            NodeError / NodeUnreachableError: as for `start_process_on_node`.
        """
        return await self._client(self.get_node(node_id)).request(method, path)

    async def start_process_on_node(self, node_id: str, process: str) -> dict[str, Any]:
        """Start `process` on a node; returns the node's answer.

        Raises:
            KeyError: unknown node.
            NodeError: the node refused (e.g. 404 unknown process).
            NodeUnreachableError: the node could not be reached (`NodeTimeoutError` when it did not answer).
        """
        return await self._client(self.get_node(node_id)).start(process)

    async def stop_process_on_node(self, node_id: str, process: str) -> dict[str, Any]:
        """Stop `process` on a node; raises like `start_process_on_node`."""
        return await self._client(self.get_node(node_id)).stop(process)

    async def restart_process_on_node(self, node_id: str, process: str) -> dict[str, Any]:
        """Restart `process` on a node; raises like `start_process_on_node`."""
        return await self._client(self.get_node(node_id)).restart(process)

    async def inject_event_on_node(
        self,
        node_id: str,
        process: str,
        payload: Mapping[str, Any] | None = None,
        *,
        trigger_id: str = "remote",
        trigger_type: str = "remote",
        metadata: Mapping[str, Any] | None = None,
        idempotency_key: str | None = None,
    ) -> dict[str, Any]:
        """Inject an event into `process` on a node; returns the node's 202 answer.

        `idempotency_key` is passed to the node as `Idempotency-Key`: the node queues the event once per key.

        Raises:
            KeyError: unknown node.
            NodeError: the node refused (404 unknown process, 400 bad payload, 429 queue full, ...).
            NodeUnreachableError: the node could not be reached (`NodeTimeoutError` when it did not answer).
        """
        client = self._client(self.get_node(node_id))
        return await client.inject_event(
            process,
            None if payload is None else dict(payload),
            trigger_id=trigger_id,
            trigger_type=trigger_type,
            metadata=None if metadata is None else dict(metadata),
            idempotency_key=idempotency_key,
        )

    async def broadcast_event(
        self,
        process: str,
        payload: Mapping[str, Any] | None = None,
        *,
        node_ids: Iterable[str] | None = None,
        trigger_type: str = "remote",
        metadata: Mapping[str, Any] | None = None,
        idempotency_key: str | None = None,
    ) -> dict[str, dict[str, Any]]:
        """Inject the same event into `process` on many nodes at once.

        Args:
            process: the process name on each node.
            payload: the event payload.
            node_ids: the targets (default: every node in the table).
            trigger_type: the event's trigger type.
            metadata: the event's metadata.
            idempotency_key: makes the broadcast safe to repeat: each node gets its own key derived from this
                one and its node id (`derive_idempotency_key`), so a retried broadcast queues nothing twice.

        Returns:
            node id -> the node's answer, or `{"error": ..., "status_code": ...}` for an HTTP error, or
            `{"error": ..., "unreachable": True}` / `{"error": ..., "timeout": True}`: every target answers.
        """
        targets = list(self._nodes) if node_ids is None else list(dict.fromkeys(node_ids))
        results: dict[str, dict[str, Any]] = {}

        async def one(node_id: str) -> None:
            try:
                async with self._limiter:
                    results[node_id] = await self.inject_event_on_node(
                        node_id,
                        process,
                        payload,
                        trigger_type=trigger_type,
                        metadata=metadata,
                        idempotency_key=derive_idempotency_key(idempotency_key, node_id) if idempotency_key else None,
                    )
            except KeyError as exc:
                results[node_id] = {"error": str(exc.args[0]), "status_code": 404}
            except NodeError as exc:
                results[node_id] = {"error": exc.message, "status_code": exc.status_code}
            except NodeTimeoutError as exc:
                results[node_id] = {"error": str(exc), "timeout": True}
            except NodeUnreachableError as exc:
                results[node_id] = {"error": str(exc), "unreachable": True}
            except Exception as exc:  # every target answers, whatever one of them did
                logger.exception("broadcast to node %s failed unexpectedly", node_id)
                results[node_id] = {"error": f"{type(exc).__name__}: {exc}", "status_code": 500}

        async with anyio.create_task_group() as tg:
            for node_id in targets:
                tg.start_soon(one, node_id)
        return {node_id: results[node_id] for node_id in targets}

    # -- plumbing -------------------------------------------------------------------------------------------

    def _client(self, info: NodeInfo) -> NodeClient:
        token = info.auth_token or self._auth_token
        key = (info.url, token)
        entry = self._pools.get(info.node_id)
        if entry is None or entry[0] != key:
            if entry is not None:
                self._retired.append(entry[1])
            pool = httpx.AsyncClient(verify=self._ssl, limits=_NODE_POOL_LIMITS)
            entry = self._pools[info.node_id] = (key, pool)
        return NodeClient.from_client(
            entry[1],
            info.url,
            auth_token=token,
            timeout=self.request_timeout,
            max_response_bytes=self.max_response_bytes,
        )

    def _retire(self, node_id: str, url: str) -> None:
        """Schedule the closing of what was kept open for a node that left (or moved)."""
        self._forgotten.append(url)
        entry = self._pools.pop(node_id, None)
        if entry is not None:
            self._retired.append(entry[1])

    async def _close_retired(self) -> None:
        retired, self._retired = self._retired, []
        forgotten, self._forgotten = self._forgotten, []
        for pool in retired:
            await pool.aclose()
        for url in forgotten:
            await self._probe.forget(url)

    async def _run_monitor(self) -> None:
        while True:
            try:
                await self.check_health(processes=True)
            except Exception:  # a bug in one round must not end monitoring
                logger.exception("health check round failed")
            await anyio.sleep(self.health_check_interval)

    async def aclose(self) -> None:
        """Close every node's connection pool and end the change streams."""
        self._changes.close()
        self._retired.extend(pool for _, pool in self._pools.values())
        self._pools.clear()
        await self._close_retired()
        await self._probe.aclose()

    async def __aenter__(self) -> RuntimeCoordinator:
        monitor = anyio.create_task_group()
        await monitor.__aenter__()
        monitor.start_soon(self._run_monitor)
        self._monitor = monitor
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        monitor, self._monitor = self._monitor, None
        try:
            if monitor is not None:
                monitor.cancel_scope.cancel()
                await monitor.__aexit__(None, None, None)
        finally:
            await self.aclose()

    def __repr__(self) -> str:
        return f"RuntimeCoordinator(nodes={len(self._nodes)}, healthy={len(self.healthy_nodes)})"
