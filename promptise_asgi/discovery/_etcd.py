"""An etcd-backed node registry: `EtcdDiscovery`, for clusters beyond one machine.

Talks to etcd's v3 JSON gateway (`/v3/kv/*`, `/v3/lease/*`, `/v3/watch`) with one httpx pool, so it runs on
asyncio and trio with no extra client library. A node is one key `prefix + node_id` whose JSON value is its
registration, attached to a lease of `ttl` seconds: heartbeat is a lease keep-alive, expiry is etcd's. Knows
nothing of Starlette, of the runtime or of the coordinator: it only satisfies `ProcessDiscovery` (plus `heartbeat`
and `watch`).
"""

from __future__ import annotations

import base64
import json
import logging
import math
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import anyio
import httpx

from .._errors import EtcdError, EtcdUnavailableError
from .._validation import check_seconds, normalize_url, parse_endpoints, validate_metadata, validate_node_id
from ._base import DiscoveredNode, NodeChange
from ._etcd_gateway import LEASE_NOT_FOUND, EtcdGateway, b64, close_stream, prefix_range_end, watch_message

__all__ = ["EtcdDiscovery", "EtcdError", "EtcdUnavailableError"]

logger = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(slots=True)
class _Registration:
    url: str
    metadata: dict[str, Any]
    lease: int | None = None


class EtcdDiscovery:
    """A node registry kept in etcd: a lease per node, shared by every coordinator that reads the prefix.

    Use it as an async context manager (or call `aclose()`): it holds one httpx connection pool.

    A node's record lives at `prefix + node_id`; `discovered_at` of a discovered node is the wall-clock time
    (`time.time()`) of its last registration, as written in the record, so every reader sees the same value.
    Liveness is etcd's business: the key disappears when the lease is not kept alive for `ttl` seconds.

    Args:
        endpoints: etcd client URLs, as a sequence or a comma-separated string; a bare `host:port` means http.
            Requests go to the endpoint that last answered, failing over to the others in order on connection
            errors and on 503 (never on other HTTP errors).
        prefix: key prefix of the registry; a trailing `/` is added when missing.
        ttl: lease time-to-live in seconds (rounded up to whole seconds; etcd raises it to its own minimum).
        timeout: seconds allowed for each request to etcd (the watch stream waits for events without limit).
        transport: an httpx transport to use instead of the network (tests).

    Attributes:
        watch_backoff: (first, longest) pause in seconds between reconnection attempts of `watch()`.

    Raises:
        ValueError: an endpoint is not an http(s) URL, the prefix is empty or ttl is not positive.
    """

    def __init__(
        self,
        endpoints: str | Sequence[str],
        prefix: str = "/promptise/nodes/",
        ttl: float = 60,
        *,
        timeout: float = 5.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        parsed = parse_endpoints(endpoints)
        if not isinstance(prefix, str) or not prefix:
            raise ValueError("prefix must be a non-empty string")
        self._prefix = prefix if prefix.endswith("/") else prefix + "/"
        self._ttl = math.ceil(check_seconds("ttl", ttl))
        self._timeout = check_seconds("timeout", timeout)
        self._gateway = EtcdGateway(parsed, self._timeout, transport)
        self._registrations: dict[str, _Registration] = {}
        self._locks: dict[str, anyio.Lock] = {}
        self._watch_scopes: set[anyio.CancelScope] = set()
        self._requests_in_watch = 0
        self._watch_requests_done: anyio.Event | None = None
        self._watch_error: str | None = None
        self._closed = False
        self.watch_backoff = (0.1, 2.0)

    def __repr__(self) -> str:
        endpoints = list(self._gateway.endpoints)
        return f"EtcdDiscovery(endpoints={endpoints!r}, prefix={self._prefix!r}, ttl={self._ttl})"

    @property
    def endpoints(self) -> tuple[str, ...]:
        """The etcd client URLs, in failover order (credentials removed)."""
        return self._gateway.endpoints

    @property
    def description(self) -> str:
        """`etcd <endpoints>`, as messages name this registry."""
        return "etcd " + ", ".join(self.endpoints)

    @property
    def prefix(self) -> str:
        """The key prefix under which nodes are registered."""
        return self._prefix

    @property
    def ttl(self) -> int:
        """The lease time-to-live in whole seconds."""
        return self._ttl

    @property
    def watch_error(self) -> str | None:
        """Why a running `watch()` cannot reach etcd now (it keeps retrying); None while it follows etcd."""
        return self._watch_error

    async def __aenter__(self) -> EtcdDiscovery:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the connection pool and end every running `watch()`; leases are left to expire.

        Nodes are not unregistered: a node that stops cleanly calls `unregister` itself, and one that does not
        is dropped by etcd when its lease runs out.
        """
        self._closed = True
        for scope in list(self._watch_scopes):
            scope.cancel()
        if self._requests_in_watch:
            self._watch_requests_done = anyio.Event()
            with anyio.move_on_after(self._timeout):
                await self._watch_requests_done.wait()
        await self._gateway.aclose()

    # --- ProcessDiscovery -------------------------------------------------------------------------------

    async def register(self, node_id: str, url: str, metadata: dict[str, Any] | None = None) -> None:
        """Add or refresh a node: keep its lease alive (or grant one) and write its record.

        Registering again replaces the url and metadata and refreshes the lease.

        Args:
            node_id: the node's id (`^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$`).
            url: the node's http(s) base URL; trailing slashes are stripped.
            metadata: a JSON object stored with the node.

        Raises:
            ValueError: the node id, url or metadata is invalid (nothing is sent to etcd).
            EtcdUnavailableError: no endpoint answered.
            EtcdError: etcd refused the request.
        """
        node_id = validate_node_id(node_id)
        url = normalize_url(url)
        metadata = validate_metadata(metadata)
        self._check_open()
        async with self._lock(node_id):
            previous = self._registrations.get(node_id)
            lease = previous.lease if previous is not None else None
            if lease is not None and not await self._keep_alive(lease):
                lease = None
            registration = _Registration(url, metadata, lease)
            await self._write(node_id, registration)
            self._registrations[node_id] = registration

    async def heartbeat(self, node_id: str) -> bool:
        """Keep a node registered by this instance alive.

        A lease that etcd no longer knows (expired, revoked, or lost with etcd's data) is not renewed: a new
        lease is granted and the node's last registration is written again.

        Args:
            node_id: a node registered through this instance.

        Returns:
            True when the node is registered for another `ttl` seconds; False when this instance never
            registered it (or unregistered it), so the caller knows to call `register`.

        Raises:
            EtcdUnavailableError: no endpoint answered (keep the node and retry later).
            EtcdError: etcd refused the request.
        """
        if node_id not in self._registrations:
            return False
        self._check_open()
        async with self._lock(node_id):
            registration = self._registrations.get(node_id)
            if registration is None:  # unregistered while this heartbeat waited for the lock
                return False
            if registration.lease is not None and await self._keep_alive(registration.lease):
                return True
            logger.info("lease of node %r is gone from etcd; granting a new one and registering again", node_id)
            registration.lease = None
            await self._write(node_id, registration)
            return True

    async def discover(self) -> list[DiscoveredNode]:
        """Return every node registered under the prefix, in key order.

        Records that cannot be decoded are skipped with a warning in the `promptise_asgi.etcd` log.

        Raises:
            EtcdUnavailableError: no endpoint answered (an outage is never reported as an empty cluster).
            EtcdError: etcd refused the request.
        """
        self._check_open()
        nodes, _ = await self._snapshot()
        return list(nodes.values())

    async def unregister(self, node_id: str) -> None:
        """Remove a node and revoke its lease; removing an unknown node is a no-op.

        This works from any instance, not only the one that registered the node: the lease found on the key is
        revoked, so the owner's next `heartbeat` grants a new one and the node comes back if it is still alive
        (as it would after a coordinator restart).

        Raises:
            EtcdUnavailableError: no endpoint answered.
            EtcdError: etcd refused the request.
        """
        self._check_open()
        try:
            validate_node_id(node_id)
        except ValueError:
            return  # no such node can have been registered
        # The lock keeps a concurrent heartbeat from writing the node back after it is deleted.
        async with self._lock(node_id):
            # Forgotten first: if etcd is down now, no heartbeat keeps the lease alive and the node expires.
            registration = self._registrations.pop(node_id, None)
            result = await self._gateway.post("/v3/kv/deleterange", {"key": b64(self._key(node_id)), "prev_kv": True})
            leases = {int(kv["lease"]) for kv in result.get("prev_kvs", []) if int(kv.get("lease", 0))}
            if registration is not None and registration.lease is not None:
                leases.add(registration.lease)
            for lease in leases:
                await self._revoke(lease)

    # --- watch ------------------------------------------------------------------------------------------

    async def watch(
        self, *, include_existing: bool = False, known: Iterable[DiscoveredNode] | None = None
    ) -> AsyncGenerator[NodeChange, None]:
        """Stream join and leave changes under the prefix, as they happen.

        A put is a `"join"` (also a re-registration), a delete or a lease expiry a `"leave"`. When the stream
        drops, it reconnects (with a backoff, failing over between endpoints, as long as it takes) and resumes
        after the last revision seen, so no change is lost. If etcd compacted that revision away meanwhile,
        the registry is read afresh and the differences are emitted as joins and leaves.

        The iteration ends when the consumer stops it (`aclose()`, or leaving `contextlib.aclosing`) or when
        this instance is closed. Close it explicitly (`async with contextlib.aclosing(d.watch()) as changes:`)
        rather than leaving it to the garbage collector.

        While it cannot reach etcd, `watch_error` says why.

        Args:
            include_existing: first emit a join for every node already registered.
            known: the nodes the caller holds already: the watch starts with the differences from them (a join
                for each node new or changed, a leave for each one gone) instead of a join for every node.

        Yields:
            `NodeChange(kind, node_id, node)`, with `node` None on leave.
        """
        self._check_open()
        held: dict[str, DiscoveredNode] = {} if known is None else {node.node_id: node for node in known}
        seeded = known is not None
        next_revision: int | None = None
        read_once = False  # whether etcd was read yet: the first reading is compared with the caller's `known`
        response: httpx.Response | None = None
        lines: AsyncIterator[str] | None = None
        delay = self.watch_backoff[0]
        try:
            while not self._closed:
                if next_revision is None:
                    snapshot: tuple[dict[str, DiscoveredNode], int] | None = None
                    with self._interruptible():
                        try:
                            snapshot = await self._uncut(self._snapshot())
                        except EtcdUnavailableError as exc:
                            self._watch_error = str(exc)
                            logger.warning("etcd watch: %s; retrying in %.1fs", exc, delay)
                            await anyio.sleep(delay)
                            delay = min(delay * 2, self.watch_backoff[1])
                    if snapshot is None:
                        continue
                    nodes, revision = snapshot
                    self._watch_error = None
                    changes: list[NodeChange] = []
                    if seeded or include_existing:
                        # The caller's picture has no registration times: compare what a node is, not when it came.
                        changes = _diff(held, nodes, by_content=known is not None and not read_once)
                    held, seeded, next_revision, read_once = nodes, True, revision + 1, True
                    for change in changes:
                        yield change
                    continue
                with self._interruptible():
                    try:
                        response = await self._uncut(self._open_watch(next_revision))
                        lines = response.aiter_lines()
                        self._watch_error = None
                    except EtcdUnavailableError as exc:
                        self._watch_error = str(exc)
                        logger.warning("etcd watch: %s; retrying in %.1fs", exc, delay)
                        await anyio.sleep(delay)
                        delay = min(delay * 2, self.watch_backoff[1])
                if response is None or lines is None:
                    continue
                while not self._closed:
                    message: dict[str, Any] | None = None
                    ended = True
                    with self._interruptible():
                        try:
                            line = await anext(lines)
                            ended = False
                            message = watch_message(line)
                        except (StopAsyncIteration, httpx.HTTPError) as exc:
                            logger.warning(
                                "etcd watch stream dropped (%r); resuming at revision %d", exc, next_revision
                            )
                    if ended:
                        break
                    if message is None:
                        continue
                    delay = self.watch_backoff[0]
                    if message.get("canceled"):
                        if int(message.get("compact_revision", 0)):
                            logger.warning(
                                "etcd compacted revision %d away; reading the registry afresh", next_revision
                            )
                            next_revision = None
                        break
                    changes = []
                    for event in message.get("events", []):
                        kv = event.get("kv", {})
                        next_revision = max(next_revision, int(kv.get("mod_revision", 0)) + 1)
                        event_change = self._change(event.get("type", "PUT"), kv, held)
                        if event_change is not None:
                            changes.append(event_change)
                    for change in changes:
                        yield change
                await close_stream(lines, response)
                lines = response = None
                if next_revision is not None and not self._closed:
                    with self._interruptible():
                        await anyio.sleep(delay)
                    delay = min(delay * 2, self.watch_backoff[1])
        finally:
            with anyio.CancelScope(shield=True):
                await close_stream(lines, response)

    # --- internals --------------------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"{self!r} is closed")

    def _lock(self, node_id: str) -> anyio.Lock:
        lock = self._locks.get(node_id)
        if lock is None:
            lock = self._locks[node_id] = anyio.Lock()
        return lock

    def _key(self, node_id: str) -> bytes:
        return (self._prefix + node_id).encode()

    @contextmanager
    def _interruptible(self) -> Iterator[None]:
        """A step of `watch()` that `aclose()` can cut short; never spans a `yield`."""
        scope = anyio.CancelScope()
        self._watch_scopes.add(scope)
        try:
            with scope:
                yield
        finally:
            self._watch_scopes.discard(scope)

    async def _uncut(self, request: Awaitable[T]) -> T:
        """Finish a request of `watch()` even when `aclose()` comes meanwhile (it waits for these).

        httpx abandons a request body cut mid-send (by cancellation or a closed socket) to the garbage
        collector, which trio reports as a ResourceWarning; one request, at most `timeout`, is a fair price
        for closing quietly.
        """
        self._requests_in_watch += 1
        try:
            with anyio.CancelScope(shield=True):
                result = await request
            return result
        finally:
            self._requests_in_watch -= 1
            if not self._requests_in_watch and self._watch_requests_done is not None:
                self._watch_requests_done.set()

    async def _open_watch(self, start_revision: int) -> httpx.Response:
        prefix = self._prefix.encode()
        body = {
            "create_request": {
                "key": b64(prefix),
                "range_end": b64(prefix_range_end(prefix)),
                "start_revision": str(start_revision),
            }
        }
        return await self._gateway.open_stream("/v3/watch", body)

    async def _grant(self) -> int:
        result = await self._gateway.post("/v3/lease/grant", {"TTL": str(self._ttl)})
        return int(result["ID"])

    async def _keep_alive(self, lease: int) -> bool:
        """Renew `lease`; False when etcd no longer knows it (its answer then carries no TTL, or TTL 0)."""
        result = await self._gateway.post("/v3/lease/keepalive", {"ID": str(lease)})
        return int(result.get("TTL", 0)) > 0

    async def _revoke(self, lease: int) -> None:
        try:
            await self._gateway.post("/v3/lease/revoke", {"ID": str(lease)})
        except EtcdError as exc:
            if LEASE_NOT_FOUND not in exc.message or isinstance(exc, EtcdUnavailableError):
                raise

    async def _write(self, node_id: str, registration: _Registration) -> None:
        """Put the node's record with its lease, granting a lease when it has none or etcd lost it."""
        record = {
            "node_id": node_id,
            "url": registration.url,
            "metadata": registration.metadata,
            "registered_at": time.time(),
        }
        value = b64(json.dumps(record, separators=(",", ":")).encode())
        if registration.lease is None:
            registration.lease = await self._grant()
        try:
            await self._put(node_id, value, registration.lease)
        except EtcdError as exc:
            # The lease can expire between keep-alive and put; one fresh lease settles it.
            if isinstance(exc, EtcdUnavailableError) or LEASE_NOT_FOUND not in exc.message:
                raise
            registration.lease = await self._grant()
            await self._put(node_id, value, registration.lease)

    async def _put(self, node_id: str, value: str, lease: int) -> None:
        await self._gateway.post("/v3/kv/put", {"key": b64(self._key(node_id)), "value": value, "lease": str(lease)})

    async def _snapshot(self) -> tuple[dict[str, DiscoveredNode], int]:
        prefix = self._prefix.encode()
        result = await self._gateway.post(
            "/v3/kv/range", {"key": b64(prefix), "range_end": b64(prefix_range_end(prefix))}
        )
        nodes: dict[str, DiscoveredNode] = {}
        for kv in result.get("kvs", []):
            node = self._decode_node(kv)
            if node is not None:
                nodes[node.node_id] = node
        return nodes, int(result.get("header", {}).get("revision", 0))

    def _node_id_of(self, kv: dict[str, Any]) -> str | None:
        try:
            key = base64.b64decode(kv.get("key", ""), validate=True).decode()
        except (ValueError, UnicodeDecodeError):
            return None
        if not key.startswith(self._prefix):
            return None
        try:
            return validate_node_id(key[len(self._prefix) :])
        except ValueError:
            return None

    def _decode_node(self, kv: dict[str, Any]) -> DiscoveredNode | None:
        node_id = self._node_id_of(kv)
        try:
            if node_id is None:
                raise ValueError(f"key is not {self._prefix!r} followed by a valid node id")
            record = json.loads(base64.b64decode(kv.get("value", ""), validate=True))
            if not isinstance(record, dict):
                raise ValueError("record is not a JSON object")
            if record.get("node_id") != node_id:
                raise ValueError(f"record names node {record.get('node_id')!r}")
            registered_at = record.get("registered_at")
            if isinstance(registered_at, bool) or not isinstance(registered_at, int | float):
                raise ValueError("registered_at is not a number")
            metadata = record.get("metadata", {})
            if not isinstance(metadata, dict):  # it came out of JSON, so a dict is all there is to check
                raise ValueError("metadata is not a JSON object")
            return DiscoveredNode(
                node_id=node_id,
                url=normalize_url(record.get("url")),
                discovered_at=float(registered_at),
                metadata=metadata,
            )
        except (ValueError, UnicodeDecodeError) as exc:
            logger.warning("skipping undecodable etcd entry %r: %s", kv.get("key"), exc)
            return None

    def _change(self, kind: str, kv: dict[str, Any], known: dict[str, DiscoveredNode]) -> NodeChange | None:
        if kind == "DELETE":
            node_id = self._node_id_of(kv)
            if node_id is None:
                return None
            known.pop(node_id, None)
            return NodeChange("leave", node_id)
        node = self._decode_node(kv)
        if node is None:
            # A record overwritten with garbage no longer describes a reachable node.
            node_id = self._node_id_of(kv)
            if node_id is not None and known.pop(node_id, None) is not None:
                return NodeChange("leave", node_id)
            return None
        known[node.node_id] = node
        return NodeChange("join", node.node_id, node)


def _diff(
    before: dict[str, DiscoveredNode], after: dict[str, DiscoveredNode], *, by_content: bool = False
) -> list[NodeChange]:
    """Joins and leaves from `before` to `after`; `by_content` compares url and metadata only."""

    def same(old: DiscoveredNode | None, new: DiscoveredNode) -> bool:
        if old is None:
            return False
        return (old.url, old.metadata) == (new.url, new.metadata) if by_content else old == new

    changes = [NodeChange("leave", node_id) for node_id in before if node_id not in after]
    changes += [
        NodeChange("join", node_id, node) for node_id, node in after.items() if not same(before.get(node_id), node)
    ]
    return changes
