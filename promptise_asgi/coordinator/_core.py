"""`RuntimeCoordinator`: one view of every node's health, and remote control of their processes.

It keeps a node table (`_table`) fed by registrations and by any `ProcessDiscovery` backend (`_backend`: a
watch where the backend offers one, else a listing each round), takes the health of nodes that heartbeat with
a digest from their heartbeats, checks the others concurrently (bounded, each check with its own timeout,
damped against flapping), and steers processes on nodes through `NodeClient`, one small pool per node. Runs
on asyncio and trio. Knows nodes only through their HTTP API, and serves no HTTP itself (`_app` does).
"""

from __future__ import annotations

import logging
import ssl
import time
from collections.abc import Callable, Iterable, Mapping
from types import TracebackType
from typing import Any, Literal

import anyio
from anyio.abc import TaskGroup

from .._changes import ChangeHub, Subscription
from .._errors import (
    ClusterFullError,
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
from ..discovery import DiscoveredNode, HasTTL, ProcessDiscovery, RegistryDiscovery, SupportsHeartbeat
from ._backend import BackendLink
from ._digest import DEFAULT_MAX_DIGEST_BYTES, Digest
from ._health import HealthKeeper
from ._pools import NodePools
from ._probe import HealthProbe
from ._table import NodeInfo, NodeTable, check_page

__all__ = ["NodeInfo", "RuntimeCoordinator"]

logger = logging.getLogger("promptise_asgi.coordinator")

DEFAULT_MAX_NODES = 100_000
DEFAULT_MAX_METADATA_BYTES = 16 * 1024
DEFAULT_MAX_RESPONSE_BYTES = 8 * 1024 * 1024
# A node heartbeats this share of health_check_interval apart, so its digest is fresh at every round.
_HEARTBEAT_SHARE = 2 / 3


class RuntimeCoordinator:
    """Tracks a cluster's nodes and steers their processes.

    `async with RuntimeCoordinator(...) as coordinator:` runs the health monitor (a round every
    `health_check_interval` seconds), follows the discovery backend's watch when it has one, and closes the
    connection pool on exit. Every call also works outside `async with` on a coordinator that was never
    entered; such a coordinator reads its discovery backend on each status or listing instead.

    A node that heartbeats with a digest (`accept_heartbeat(node_id, digest)`, what self-registration sends)
    is healthy from its heartbeats while its digest is younger than `health_check_interval`, and is not
    polled; the others are polled every round. Once a node's digest goes stale it is polled again, and
    `node_timeout` counts from its last heartbeat.

    Args:
        discovery: a `ProcessDiscovery` backend whose nodes join the table (and leave it when they expire).
        health_check_interval: seconds between background health checks; also how long a heartbeat digest
            stays fresh.
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
        max_digest_bytes: the largest heartbeat body (a digest) the coordinator app reads (413 beyond).
        discovery_timeout: seconds a call to the discovery backend may take before the coordinator answers
            from its table (status) or refuses (registration, `DiscoveryUnavailableError`).
        clock: monotonic clock used for `node_timeout` and digest freshness (injectable for tests).

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
        max_digest_bytes: int = DEFAULT_MAX_DIGEST_BYTES,
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
        self.max_digest_bytes = check_count("max_digest_bytes", max_digest_bytes)
        self.discovery = discovery
        self.address_rules = NodeAddressRules(node_networks)
        self._auth_token = None if auth_token is None else clean_token(auth_token)
        self._clock = clock
        self._table = NodeTable()
        self._nodes = self._table.by_id  # read-only: the table changes only through its own methods
        # Asked once: a Protocol isinstance check costs more than the registry's heartbeat itself.
        self._heartbeats = discovery if isinstance(discovery, SupportsHeartbeat) else None
        # The in-process registry cannot hang (a dict, a lock never held across an await): its heartbeats skip
        # the discovery timeout, whose cancel scope cost five times the heartbeat (py-spy, 5,000 a second).
        self._in_process = type(discovery) is RegistryDiscovery
        self._backend = None if discovery is None else BackendLink(
            discovery,
            self.discovery_timeout,
            accept=self._accept_discovered,
            drop=self._drop_discovered,
            held=self._held_nodes,
            held_ids=lambda: [node_id for node_id, info in self._nodes.items() if info.source == "discovered"],
        )  # fmt: skip
        self._limiter = anyio.CapacityLimiter(max_concurrency)
        ssl_context = ssl.create_default_context()  # one CA bundle for every pool and probe, not one per node
        self._probe = HealthProbe(timeout=self.request_timeout, ssl_context=ssl_context)
        self._pools = NodePools(
            ssl_context, self._probe, timeout=self.request_timeout, max_response_bytes=self.max_response_bytes
        )
        self._monitor: TaskGroup | None = None
        self._changes = ChangeHub(self.table_status)
        self._health = HealthKeeper(
            self._table,
            self._probe,
            self._changes,
            self._limiter,
            fresh_for=self.health_check_interval,
            node_timeout=self.node_timeout,
            token_for=lambda info: info.auth_token or self._auth_token,
            clock=clock,
        )

    # -- node table -----------------------------------------------------------------------------------------

    @property
    def nodes(self) -> Mapping[str, NodeInfo]:
        """A read-only view of the node table by id."""
        return self._nodes

    @property
    def node_token(self) -> str | None:
        """The token sent to nodes, which nodes must also present to register over HTTP (None when unset)."""
        return self._auth_token

    @property
    def heartbeat_interval(self) -> float:
        """How often a node should heartbeat: often enough for its digest to be fresh at every health round,
        and for the discovery backend's TTL (a third of it) to never run out."""
        interval = self.health_check_interval * _HEARTBEAT_SHARE
        ttl = self.discovery.ttl if isinstance(self.discovery, HasTTL) else None
        return round(interval if ttl is None else min(interval, ttl / 3), 3)

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
            The registration's answer: `{"status": "registered", "node_id", "url", "heartbeat_interval"}` plus
            the backend's `ttl`; `heartbeat_interval` is how often the node should heartbeat.

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
            and (existing.auth_token is not None or await self._health.answers_as(existing))
        ):
            raise NodeConflictError(node_id)
        self._check_room(node_id)
        answer: dict[str, Any] = {"status": "registered", "node_id": node_id, "url": url}
        answer["heartbeat_interval"] = self.heartbeat_interval
        discovery, backend = self.discovery, self._backend
        if discovery is None or backend is None:
            self._upsert(node_id, url, meta, "registered")
            return answer
        await backend.call(discovery.register(node_id, url, meta))
        existing = self._nodes.get(node_id)
        self._upsert(node_id, url, meta, existing.source if existing is not None else "discovered")
        if isinstance(discovery, HasTTL) and discovery.ttl is not None:
            answer["ttl"] = discovery.ttl
        return answer

    async def accept_heartbeat(self, node_id: str, digest: Digest | None = None) -> bool:
        """A node's heartbeat: False when the registry does not know it (the node then registers again).

        Args:
            node_id: the node.
            digest: what the node says it runs (`parse_digest` of the heartbeat's body): the node is then
                healthy from this heartbeat, and is not polled while the digest is fresh.

        Raises:
            DiscoveryUnavailableError: the discovery backend failed or did not answer in time.
        """
        if self._heartbeats is None or self._backend is None:
            known = node_id in self._nodes
        elif self._in_process:
            known = await self._heartbeats.heartbeat(node_id)
        else:
            known = await self._backend.call(self._heartbeats.heartbeat(node_id))
        if known and digest is not None:
            self._health.note_digest(node_id, digest)
        return known

    async def accept_unregistration(self, node_id: str) -> bool:
        """A node leaving (`DELETE /cluster/nodes/{id}`); False when the table did not know it.

        Raises:
            DiscoveryUnavailableError: the discovery backend failed or did not answer in time.
        """
        if self.discovery is not None and self._backend is not None:
            await self._backend.call(self.discovery.unregister(node_id))
        return self._remove(node_id, "unregistered")

    def unregister_node(self, node_id: str) -> None:
        """Remove a node from the table.

        Raises:
            KeyError: the node is not registered.
        """
        self.get_node(node_id)
        self._remove(node_id, "unregistered")

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
            self._table.put(info)
            self._changes.publish("node.joined", {"node_id": node_id, "url": url, "metadata": dict(metadata)})
        else:
            info.metadata = metadata
            info.source = source if info.source == "discovered" else info.source
            if auth_token is not None:
                info.auth_token = auth_token
        return info

    def _remove(self, node_id: str, reason: str) -> bool:
        info = self._table.pop(node_id)
        if info is None:
            return False
        self._retire(node_id, info.url)
        self._changes.publish("node.left", {"node_id": node_id, "reason": reason})
        return True

    def _accept_discovered(self, node: DiscoveredNode) -> None:
        """A node the backend lists: into the table unless it is known as it is, or registered in process (an
        explicit registration wins over what discovery says).

        Raises:
            ValueError / ClusterFullError: an entry a registration would be refused for (the caller logs it).
        """
        existing = self._nodes.get(node.node_id)
        if existing is not None and (
            existing.source == "registered" or (existing.url == node.url and existing.metadata == node.metadata)
        ):
            return
        validate_node_id(node.node_id)
        url = self.address_rules.check_url(node.url)
        meta = self._checked_metadata(node.metadata)
        self._check_room(node.node_id)
        self._upsert(node.node_id, url, meta, "discovered")

    def _drop_discovered(self, node_id: str) -> None:
        info = self._nodes.get(node_id)
        if info is not None and info.source == "discovered":
            self._remove(node_id, "expired")

    def _held_nodes(self) -> list[DiscoveredNode]:
        return [
            DiscoveredNode(info.node_id, info.url, metadata=info.metadata)
            for info in self._nodes.values()
            if info.source == "discovered"
        ]

    async def sync_discovery(self) -> None:
        """Bring the table in step with the discovery backend: pull its nodes in, drop discovered nodes it no
        longer lists. While the coordinator follows the backend's watch (etcd, inside `async with`), the table
        is in step already and nothing is read.

        A backend that fails, or does not answer within `discovery_timeout`, leaves the table as it was and
        is reported in `cluster_status()["discovery"]`. Entries the coordinator would refuse from a
        registration (a bad URL, oversized metadata, beyond `max_nodes`) are skipped with a log line.
        """
        if self._backend is not None:
            await self._backend.sync()
        await self._close_retired()

    async def _refresh(self) -> None:
        """Before answering from the table: read the backend, unless the monitor keeps the table (a watch, or
        a listing each round), which answering a status or a page must not pay for at 10,000 nodes."""
        if self._monitor is None:
            await self.sync_discovery()

    # -- health and status ----------------------------------------------------------------------------------

    async def check_health(self, *, processes: bool = False) -> dict[str, dict[str, Any]]:
        """Check every node without a fresh heartbeat digest at once (bounded by `max_concurrency`, each within
        `request_timeout`); nodes with one are healthy from their heartbeats.

        Args:
            processes: also read each healthy polled node's `/processes`, for `node.processes` changes (the
                monitor's rounds do; an on-demand status does not need to).

        Returns:
            node id -> the node's `/health` answer (for a node with a fresh digest, the same fields from its
            heartbeat), or `{"status": "unhealthy", "error": ...}`.
        """
        await self.sync_discovery()
        infos = self._table.values()
        polled = await self._health.check(infos, processes)
        return {info.node_id: polled.get(info.node_id) or info.health or {} for info in infos}

    def note_processes(self, node_id: str, processes: list[Any]) -> None:
        """Record what a node runs (from a check or a heartbeat digest) and announce a change of its processes'
        names or states (`node.processes`)."""
        self._health.note_processes(node_id, processes)

    async def cluster_status(self, *, limit: int | None = None, after: str | None = None) -> dict[str, Any]:
        """Summarise the cluster, checking now the nodes (of the page) without a fresh heartbeat digest.

        Args:
            limit: list at most this many nodes (1 to 1,000), in id order; None lists every node.
            after: with `limit`, start after this node id (the previous page's `next`).

        Returns:
            `{"total_nodes", "healthy_nodes", "unhealthy_nodes", "total_processes", "nodes": {id: {...}}}`,
            each node entry being `NodeInfo.to_dict()` plus its `"health"` answer or error; with a discovery
            backend also `"discovery": {"ok", "error", "since"}` (`since`: when it started failing); with
            `limit` also `"next"`, the cursor of the next page (None after the last). The totals always count
            every node.

        Raises:
            ValueError: `limit` or `after` out of range.
        """
        limit, after, _, _ = check_page(limit, after)
        await self._refresh()
        if limit is None:
            infos, next_id = self._table.values(), None
        else:
            infos, next_id = self._table.page(limit=limit, after=after)
        await self._close_retired()
        status = self._summary(infos, await self._health.check(infos))
        if limit is not None:
            status["next"] = next_id
        return status

    async def node_page(
        self, *, limit: int = 100, after: str | None = None, health: str | None = None, q: str | None = None
    ) -> dict[str, Any]:
        """One page of the node table, in id order, from the table (nothing is checked).

        Args:
            limit: the most nodes listed (1 to 1,000).
            after: start after this node id (the previous page's `next`).
            health: only nodes whose verdict is `healthy`, `unhealthy` or `unknown`, or `missed_check`
                (healthy, but its last check failed).
            q: only nodes whose id or a metadata value holds this text (case-insensitive).

        Returns:
            `{"nodes": [NodeInfo.to_dict(), ...], "count": listed here, "total": every node, "next": the
            cursor of the next page, or None when no node (that passes the filters) follows}`.

        Raises:
            ValueError: a parameter out of range, naming it.
        """
        checked_limit, after, health, query = check_page(limit, after, health, q, default=100)
        await self._refresh()
        infos, next_id = self._table.page(limit=checked_limit or 100, after=after, health=health, query=query)
        nodes = [info.to_dict() for info in infos]
        return {"nodes": nodes, "count": len(nodes), "total": len(self._table), "next": next_id}

    def table_status(self) -> dict[str, Any]:
        """The cluster as the table knows it now, without checking anything (what a change stream's snapshot
        holds); each node's `"health"` is its last `/health` answer."""
        return self._summary(self._table.values(), None)

    def _summary(self, infos: list[NodeInfo], health: Mapping[str, dict[str, Any]] | None) -> dict[str, Any]:
        table = self._table
        current = self._nodes
        nodes = {
            info.node_id: info.status_entry(info.health if health is None else health.get(info.node_id, info.health))
            for info in infos
            if current.get(info.node_id) is info  # not one that left (or moved) while others were checked
        }
        status: dict[str, Any] = {
            "total_nodes": len(table),
            "healthy_nodes": table.healthy,
            "unhealthy_nodes": len(table) - table.healthy,
            "total_processes": table.processes,
            "nodes": nodes,
        }
        if self._backend is not None:
            self._backend.note_watch()
            status["discovery"] = self._backend.health.to_dict()
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
        return self._pools.client(info.node_id, info.url, info.auth_token or self._auth_token)

    def _retire(self, node_id: str, url: str) -> None:
        self._pools.retire(node_id, url)

    async def _close_retired(self) -> None:
        await self._pools.close_retired()

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
        await self._pools.aclose()
        await self._probe.aclose()

    async def __aenter__(self) -> RuntimeCoordinator:
        monitor = anyio.create_task_group()
        await monitor.__aenter__()
        if self._backend is not None and self._backend.start_following():
            monitor.start_soon(self._backend.follow)  # before the first round, which then lists nothing
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
            if self._backend is not None:
                self._backend.following = False
            await self.aclose()

    def __repr__(self) -> str:
        return f"RuntimeCoordinator(nodes={len(self._nodes)}, healthy={len(self.healthy_nodes)})"
