"""The coordinator: one view of every node's health, and remote control of their processes.

`RuntimeCoordinator` keeps a node table fed by `register_node` and by any `ProcessDiscovery` backend, checks
health concurrently (bounded, each check with its own timeout, damped against flapping), and steers
processes on nodes through `NodeClient` over one shared connection pool. `create_coordinator_app` (written
in `_coordinator_app`) serves it over HTTP. Runs on asyncio and trio. Knows nodes only through their HTTP API.
"""

from __future__ import annotations

import logging
import math
import ssl
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType, TracebackType
from typing import Any, Literal

import anyio
import httpx
from anyio.abc import TaskGroup

from ._coordinator_app import create_coordinator_app
from ._errors import NodeError, NodeTimeoutError, NodeUnreachableError
from ._probe import HealthProbe
from ._validation import clean_token, normalize_url, validate_metadata, validate_node_id
from .client import NodeClient

__all__ = ["NodeInfo", "RuntimeCoordinator", "create_coordinator_app"]

logger = logging.getLogger("promptise_asgi.coordinator")

NodeStatus = Literal["unknown", "healthy", "unhealthy"]

# Requests to one node rarely overlap (a health check, a control call): a few connections are plenty.
_NODE_POOL_LIMITS = httpx.Limits(max_connections=8, max_keepalive_connections=4)


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
    auth_token: str | None = field(default=None, repr=False)
    _last_ok: float | None = field(default=None, repr=False)  # monotonic, for node_timeout

    @property
    def is_healthy(self) -> bool:
        """True when the last verdict is healthy (possibly with missed checks inside `node_timeout`)."""
        return self.status == "healthy"

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
        auth_token: the bearer token sent to nodes (a node registered with its own token uses that one).
        max_concurrency: the most requests in flight at once (health checks, broadcasts).
        clock: monotonic clock used for `node_timeout` (injectable for tests).

    Raises:
        ValueError: a non-positive interval, timeout or concurrency, or a blank token.
    """

    def __init__(
        self,
        *,
        discovery: Any = None,
        health_check_interval: float = 15.0,
        node_timeout: float = 45.0,
        request_timeout: float = 5.0,
        auth_token: str | None = None,
        max_concurrency: int = 128,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        for name, value in (
            ("health_check_interval", health_check_interval),
            ("node_timeout", node_timeout),
            ("request_timeout", request_timeout),
        ):
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
                raise ValueError(f"{name} must be a finite number of seconds > 0, got {value!r}")
        if isinstance(max_concurrency, bool) or not isinstance(max_concurrency, int) or max_concurrency < 1:
            raise ValueError(f"max_concurrency must be an integer >= 1, got {max_concurrency!r}")
        self.discovery = discovery
        self.health_check_interval = float(health_check_interval)
        self.node_timeout = float(node_timeout)
        self.request_timeout = float(request_timeout)
        self.max_concurrency = max_concurrency
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

    # -- node table -----------------------------------------------------------------------------------------

    @property
    def nodes(self) -> Mapping[str, NodeInfo]:
        """A read-only view of the node table by id."""
        return MappingProxyType(self._nodes)

    def register_node(
        self, node_id: str, url: str, metadata: Mapping[str, Any] | None = None, *, auth_token: str | None = None
    ) -> NodeInfo:
        """Add a node to the table, or update a known one (a new URL resets its health to unknown).

        Raises:
            ValueError: invalid node id, URL, metadata or token.
        """
        return self._upsert(node_id, url, metadata, "registered", auth_token)

    def unregister_node(self, node_id: str) -> None:
        """Remove a node from the table.

        Raises:
            KeyError: the node is not registered.
        """
        info = self.get_node(node_id)
        del self._nodes[node_id]
        self._retire(node_id, info.url)

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

    def _upsert(
        self,
        node_id: str,
        url: str,
        metadata: Mapping[str, Any] | None,
        source: Literal["registered", "discovered"],
        auth_token: str | None = None,
    ) -> NodeInfo:
        validate_node_id(node_id)
        url = normalize_url(url)
        meta = validate_metadata(metadata)
        if auth_token is not None:
            auth_token = clean_token(auth_token)
        info = self._nodes.get(node_id)
        if info is not None and info.url != url:
            self._retire(node_id, info.url)
        if info is None or info.url != url:
            info = NodeInfo(node_id, url, meta, source, auth_token=auth_token)
            self._nodes[node_id] = info
        else:
            info.metadata = meta
            info.source = source if info.source == "discovered" else info.source
            if auth_token is not None:
                info.auth_token = auth_token
        return info

    async def sync_discovery(self) -> None:
        """Pull the discovery backend's nodes into the table; drop discovered nodes it no longer lists.

        A backend that fails (an etcd outage) leaves the table as it was: the failure is logged.
        """
        if self.discovery is None:
            return
        try:
            discovered = await self.discovery.discover()
        except Exception as exc:
            logger.warning("discovery failed, keeping the last known nodes: %s", exc)
            return
        seen = set()
        for node in discovered:
            seen.add(node.node_id)
            existing = self._nodes.get(node.node_id)
            if existing is not None and existing.source == "registered":
                continue  # an explicit registration wins over what discovery says
            self._upsert(node.node_id, node.url, node.metadata, "discovered")
        for node_id in [n for n, info in self._nodes.items() if info.source == "discovered" and n not in seen]:
            self._retire(node_id, self._nodes.pop(node_id).url)
        await self._close_retired()

    # -- health -------------------------------------------------------------------------------------------

    async def check_health(self) -> dict[str, dict[str, Any]]:
        """Check every node at once (bounded by `max_concurrency`, each within `request_timeout`).

        Returns:
            node id -> the node's `/health` answer, or `{"status": "unhealthy", "error": ...}`.
        """
        await self.sync_discovery()
        await self._close_retired()
        results: dict[str, dict[str, Any]] = {}
        targets = list(self._nodes.values())
        async with anyio.create_task_group() as tg:
            for info in targets:
                tg.start_soon(self._check_one, info, results)
        return results

    async def _check_one(self, info: NodeInfo, results: dict[str, dict[str, Any]]) -> None:
        try:
            async with self._limiter:
                health = await self._probe.health(info.url, info.auth_token or self._auth_token)
        except (NodeError, NodeUnreachableError) as exc:
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
            each node entry being `NodeInfo.to_dict()` plus its `"health"` answer or error.
        """
        results = await self.check_health()
        nodes = {node_id: {**info.to_dict(), "health": results.get(node_id)} for node_id, info in self._nodes.items()}
        healthy = [info for info in self._nodes.values() if info.is_healthy]
        return {
            "total_nodes": len(nodes),
            "healthy_nodes": len(healthy),
            "unhealthy_nodes": len(nodes) - len(healthy),
            "total_processes": sum(info.process_count for info in healthy),
            "nodes": nodes,
        }

    # -- remote control -------------------------------------------------------------------------------------

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
    ) -> dict[str, Any]:
        """Inject an event into `process` on a node; returns the node's 202 answer.

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
        )

    async def broadcast_event(
        self,
        process: str,
        payload: Mapping[str, Any] | None = None,
        *,
        node_ids: Iterable[str] | None = None,
        trigger_type: str = "remote",
        metadata: Mapping[str, Any] | None = None,
    ) -> dict[str, dict[str, Any]]:
        """Inject the same event into `process` on many nodes at once.

        Args:
            process: the process name on each node.
            payload: the event payload.
            node_ids: the targets (default: every node in the table).
            trigger_type: the event's trigger type.
            metadata: the event's metadata.

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
                        node_id, process, payload, trigger_type=trigger_type, metadata=metadata
                    )
            except KeyError as exc:
                results[node_id] = {"error": str(exc.args[0]), "status_code": 404}
            except NodeError as exc:
                results[node_id] = {"error": exc.message, "status_code": exc.status_code}
            except NodeTimeoutError as exc:
                results[node_id] = {"error": str(exc), "timeout": True}
            except NodeUnreachableError as exc:
                results[node_id] = {"error": str(exc), "unreachable": True}

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
        return NodeClient.from_client(entry[1], info.url, auth_token=token, timeout=self.request_timeout)

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
                await self.check_health()
            except Exception:  # a bug in one round must not end monitoring
                logger.exception("health check round failed")
            await anyio.sleep(self.health_check_interval)

    async def aclose(self) -> None:
        """Close every node's connection pool."""
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
