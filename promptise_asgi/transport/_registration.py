"""Self-registration: keep a running node registered with a discovery backend.

Registers in the background from the moment it starts (a dead or silent backend never delays the node's
start), heartbeats every `interval`, registers again when a heartbeat says the backend forgot the node (a
restarted coordinator, an expired lease), backs off while the backend fails, and unregisters at stop.
Heartbeats to a coordinator carry a digest of the node's processes (`runtime_digest`), so the coordinator
takes the node's health from them instead of polling it. Failures never reach the node, whose API keeps
serving: they are logged with what to do about them (a refused token at ERROR), again every
`REPEAT_LOG_SECONDS` while they last, and shown in the node's `GET /status` as `"registration"`. Knows the
discovery Protocol, the package's errors and the runtime's Protocols (for the digest), not HTTP servers.
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import urlsplit

import anyio

from .._detached import spawn_detached
from .._errors import ConfigError, EtcdUnavailableError, NodeError, NodeUnreachableError
from .._validation import check_seconds, is_loopback_host
from ..discovery import (
    CoordinatorDiscovery,
    HasEndpoints,
    HasTTL,
    ProcessDiscovery,
    SupportsAclose,
    SupportsHeartbeat,
)
from ._promptise import state_name
from ._shape import RuntimeLike

if TYPE_CHECKING:
    from ..config import NodeSettings

__all__ = ["SelfRegistration", "discovery_for", "registration_for", "registration_url", "runtime_digest"]

logger = logging.getLogger("promptise_asgi.registration")

DEFAULT_INTERVAL = 10.0
MIN_BACKOFF = 0.5
# A trouble that lasts is logged again this often: visible in any log, yet not one line per retry.
REPEAT_LOG_SECONDS = 60.0

State = Literal["registering", "registered", "refused", "unavailable", "unreachable", "failing", "stopped"]


class SelfRegistration:
    """Keeps `node_id` at `url` registered with `discovery` while running.

    `state` is one of "registering" (no answer yet), "registered", "refused" (the backend said no: a token,
    a conflicting node, a URL it will not call), "unavailable" (the backend cannot take registrations now),
    "unreachable" (no answer), "failing" (any other error) and "stopped"; `last_error` says why, and what
    to do, while it is not registered.

    With `digest` (a callable returning `runtime_digest(...)`), each heartbeat to a coordinator carries what
    the node runs; a coordinator that finds it too large gets the process count alone. Without an
    `interval`, the node heartbeats as often as the coordinator asks in its registration answer (else a
    third of the backend's TTL, else every 10 s).
    """

    def __init__(
        self,
        discovery: ProcessDiscovery,
        node_id: str,
        url: str,
        *,
        interval: float | None = None,
        metadata: dict[str, Any] | None = None,
        close_discovery: bool = False,
        digest: Callable[[], dict[str, Any]] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._follow_ttl = interval is None
        if interval is None:
            interval = _suggested_interval(discovery) or DEFAULT_INTERVAL
        interval = check_seconds("heartbeat_interval", interval)
        self.discovery = discovery
        self.node_id = node_id
        self.url = url
        self.interval = interval
        self.metadata = metadata
        self.close_discovery = close_discovery
        self.digest = digest
        self.state: State = "registering"
        self.last_error: str | None = None
        self._clock = clock
        self._ever_registered = False
        self._trouble_since: float | None = None
        self._logged: tuple[tuple[object, ...], float] | None = None  # the trouble last logged, and when
        self._scope = anyio.CancelScope()
        self._finished = anyio.Event()

    @property
    def registered(self) -> bool:
        """True while the backend holds this node's registration."""
        return self.state == "registered"

    def status(self) -> dict[str, Any]:
        """What the node's `GET /status` shows: `{"coordinator", "url", "state", "last_error"}`."""
        return {
            "coordinator": describe_backend(self.discovery),
            "url": self.url,
            "state": self.state,
            "last_error": self.last_error,
        }

    async def start(self) -> None:
        """Keep the node registered from now on, in the background; returns at once."""
        spawn_detached(self._run, name=f"promptise-asgi registration {self.node_id}")

    async def stop(self) -> None:
        """Stop heartbeating and unregister (an unreachable backend is logged, not raised)."""
        self._scope.cancel()
        await self._finished.wait()
        if self._ever_registered:  # never registered: nothing to take back, and no reason to wait on the backend
            try:
                with anyio.fail_after(5):
                    await self.discovery.unregister(self.node_id)
            except Exception as exc:
                logger.warning("could not unregister node %s: %s", self.node_id, exc)
        self.state = "stopped"
        if self.close_discovery and isinstance(self.discovery, SupportsAclose):
            await self.discovery.aclose()

    async def _register(self) -> bool:
        try:
            await self.discovery.register(self.node_id, self.url, self.metadata)
        except Exception as exc:
            self._failed(exc)
            return False
        if self._follow_ttl:
            # A remote registry (a coordinator) tells its TTL and interval only when answering a registration.
            self.interval = _suggested_interval(self.discovery) or self.interval
        if self._trouble_since is not None:
            # As loud as a warning: whoever watches warnings and errors saw the trouble, and must see it end.
            logger.warning(
                "node %s registered with %s as %s after %.0fs of trouble",
                self.node_id,
                describe_backend(self.discovery),
                self.url,
                self._clock() - self._trouble_since,
            )
        elif not self.registered:
            logger.info("node %s registered with %s as %s", self.node_id, describe_backend(self.discovery), self.url)
        self.state, self.last_error = "registered", None
        self._ever_registered = True
        self._trouble_since = self._logged = None
        if self.digest is not None and isinstance(self.discovery, CoordinatorDiscovery):
            # A digest at once: the coordinator takes this node's health from it instead of polling the node
            # until the next heartbeat (at a coordinator restart, every node registers again at once).
            try:
                await self._heartbeat(self.discovery)
            except Exception as exc:  # the registration stands; the next heartbeat tries again
                logger.debug("node %s: first heartbeat failed: %s", self.node_id, exc)
        return True

    async def _beat(self) -> bool:
        discovery = self.discovery
        if not self.registered or not isinstance(discovery, SupportsHeartbeat):
            return await self._register()
        try:
            known = await self._heartbeat(discovery)
        except Exception as exc:
            self._failed(exc)
            return False
        if known is False:
            logger.info("discovery forgot node %s; registering again", self.node_id)
            return await self._register()
        return True

    async def _heartbeat(self, discovery: SupportsHeartbeat) -> bool:
        digest = self._digest() if isinstance(discovery, CoordinatorDiscovery) else None
        if digest is None or not isinstance(discovery, CoordinatorDiscovery):
            return await discovery.heartbeat(self.node_id)
        try:
            return await discovery.heartbeat(self.node_id, digest)
        except NodeError as exc:
            if exc.status_code != 413 or "processes" not in digest:
                raise
            # The coordinator takes smaller digests than this node's list: the count still spares it a poll.
            logger.info("node %s: the coordinator refused a digest this large; sending the process count", self.node_id)
            return await discovery.heartbeat(self.node_id, {"process_count": digest.get("process_count", 0)})

    def _digest(self) -> dict[str, Any] | None:
        if self.digest is None:
            return None
        try:
            return self.digest()
        except Exception:  # a runtime that cannot say what it runs still heartbeats (and is polled)
            logger.exception("node %s: could not build the heartbeat digest", self.node_id)
            return None

    def _failed(self, exc: Exception) -> None:
        state, level, message = _explain(exc, self.node_id, self.url)
        self.state, self.last_error = state, message
        now = self._clock()
        if self._trouble_since is None:
            self._trouble_since = now
        # Log a new kind of trouble at once, and a lasting one again every REPEAT_LOG_SECONDS, not on every retry.
        kind = (state, getattr(exc, "status_code", None), type(exc))
        if self._logged is None or self._logged[0] != kind or now - self._logged[1] >= REPEAT_LOG_SECONDS:
            lasting = now - self._trouble_since
            since = f"failing for {lasting:.0f}s, " if lasting >= 1 else ""
            logger.log(level, "node %s is not registered: %s; %sretrying", self.node_id, message, since)
            self._logged = (kind, now)

    async def _run(self) -> None:
        try:
            with self._scope:
                backoff = MIN_BACKOFF
                ok = await self._register()
                while True:
                    if ok:
                        backoff, delay = MIN_BACKOFF, self.interval
                    else:
                        delay = backoff
                        backoff = min(backoff * 2, self.interval)
                    await anyio.sleep(delay)
                    ok = await self._beat()
        finally:
            self._finished.set()


def _explain(exc: Exception, node_id: str, url: str) -> tuple[State, int, str]:
    """What a registration failure means to an operator: a state, a log level, and what to do."""
    if isinstance(exc, NodeError):  # the coordinator answered (CoordinatorError)
        if exc.status_code in (401, 403) and "has no token" in exc.message:
            return (
                "refused",
                logging.ERROR,
                (
                    "the coordinator has no token, so it serves its own machine only; give it a node token "
                    f"(PROMPTISE_NODE_TOKEN) and set PROMPTISE_AUTH_TOKEN here to the same value ({exc})"
                ),
            )
        if exc.status_code in (401, 403):
            return (
                "refused",
                logging.ERROR,
                (
                    "the coordinator refused this node's token; set PROMPTISE_AUTH_TOKEN to the coordinator's "
                    f"node token ({exc})"
                ),
            )
        if exc.status_code == 409:
            return (
                "refused",
                logging.ERROR,
                (
                    f"the coordinator has a live node {node_id!r} registered at another URL; give this node "
                    f"another id (--node-id, PROMPTISE_NODE_ID) or stop the other one ({exc})"
                ),
            )
        if exc.status_code in (413, 422):
            return (
                "refused",
                logging.ERROR,
                (
                    f"the coordinator will not register this node as {url}; set the URL other machines reach it "
                    f"at with --advertise-url (PROMPTISE_ADVERTISE_URL) ({exc})"
                ),
            )
        if exc.status_code == 503:
            return "unavailable", logging.WARNING, f"the coordinator cannot take registrations now ({exc})"
        return "refused", logging.ERROR, str(exc)
    if isinstance(exc, NodeUnreachableError | EtcdUnavailableError | OSError | TimeoutError):
        return "unreachable", logging.WARNING, str(exc) or type(exc).__name__
    return "failing", logging.ERROR, f"{type(exc).__name__}: {exc}"


def describe_backend(discovery: ProcessDiscovery) -> str:
    """Where a backend keeps registrations, for messages: a coordinator's URL, etcd's endpoints, or its type."""
    return discovery.description if isinstance(discovery, HasEndpoints) else type(discovery).__name__


def _suggested_interval(discovery: ProcessDiscovery) -> float | None:
    """What the backend asks for (a coordinator's `heartbeat_interval`), else a third of its TTL."""
    if isinstance(discovery, CoordinatorDiscovery) and discovery.heartbeat_interval is not None:
        return discovery.heartbeat_interval
    ttl = discovery.ttl if isinstance(discovery, HasTTL) else None
    return None if ttl is None else ttl / 3


def runtime_digest(runtime: RuntimeLike) -> dict[str, Any]:
    """What a node runs, as its heartbeats tell the coordinator: `{"process_count", "processes": [{"name",
    "state", "queue_size"}]}` (`queue_size` where the runtime's process status gives it)."""
    processes = []
    for name, process in list(runtime.processes.items()):
        entry: dict[str, Any] = {"name": str(name), "state": state_name(process)}
        queued = process.status().get("queue_size")
        if isinstance(queued, int) and not isinstance(queued, bool):
            entry["queue_size"] = queued
        processes.append(entry)
    return {"process_count": len(processes), "processes": processes}


_WILDCARDS = frozenset({"", "0.0.0.0", "::", "[::]"})


async def registration_url(bound_url: str, host: str, discovery: ProcessDiscovery, node_id: str) -> str:
    """The URL a node given no advertise URL registers under.

    A node on one address registers the URL it serves on. A node bound to a wildcard address (`0.0.0.0`,
    `::`) serves every interface, and its loopback URL means nothing to another machine: unless the backend
    lives on this machine (or in process), it registers under this machine's hostname (`getfqdn()`) or, when
    that names only loopback (as on many Debian hosts), under the address of the interface that routes to
    the backend, and logs which.

    Args:
        bound_url: the URL the server listens on, loopback form for a wildcard address (it gives the port).
        host: the address the server was asked to bind.
        discovery: the backend the node registers with.
        node_id: the node's id, for messages.

    Raises:
        ValueError: a wildcard address, a remote backend, and no usable name or address for this machine.
    """
    hosts = _backend_hosts(discovery)
    if hosts is None or all(is_loopback_host(h) for h in hosts):
        return bound_url  # an in-process registry, or one on this machine: the loopback URL reaches it
    parts = urlsplit(bound_url)
    where = describe_backend(discovery)
    if host.strip() not in _WILDCARDS:
        if is_loopback_host(parts.hostname or ""):
            logger.warning(
                "node %s listens on loopback only (%s) but registers with %s, which cannot reach it there: bind "
                "an address other machines reach (with a token), or set advertise_url for a proxy in front",
                node_id,
                bound_url,
                where,
            )
        return bound_url
    name: str | None = await anyio.to_thread.run_sync(socket.getfqdn)
    how = "this machine's hostname"
    if not name or name.lower().startswith("localhost") or is_loopback_host(name):
        name = await anyio.to_thread.run_sync(_route_address, hosts[0])
        how = f"this machine's address on the route to {hosts[0]}"
    if name is None:
        raise ValueError(
            f"node {node_id} listens on all interfaces and registers with {where}, but this machine has no "
            "name or address to register that others could reach: set advertise_url (--advertise-url, "
            "PROMPTISE_ADVERTISE_URL)"
        )
    url = f"{parts.scheme}://{f'[{name}]' if ':' in name else name}:{parts.port}"
    logger.info(
        "node %s listens on all interfaces and registers with %s as %s, from %s; set advertise_url "
        "(--advertise-url, PROMPTISE_ADVERTISE_URL) if other machines reach it by another name",
        node_id,
        where,
        url,
        how,
    )
    return url


def _backend_hosts(discovery: ProcessDiscovery) -> list[str] | None:
    """The hosts a backend talks to (a coordinator's, etcd's), or None for one that names none (in process)."""
    if not isinstance(discovery, HasEndpoints) or not discovery.endpoints:
        return None
    return [urlsplit(endpoint).hostname or "" for endpoint in discovery.endpoints]


def _route_address(host: str) -> str | None:
    """This machine's address on the interface that routes to `host`, or None (no route, or loopback)."""
    try:
        family, _, _, _, address = socket.getaddrinfo(host, 9, type=socket.SOCK_DGRAM)[0]
        with socket.socket(family, socket.SOCK_DGRAM) as sock:
            sock.connect(address)  # a datagram socket sends nothing on connect: this only asks for a route
            local = str(sock.getsockname()[0])
    except OSError:
        return None
    return None if is_loopback_host(local) or local in _WILDCARDS else local


def discovery_for(settings: NodeSettings) -> ProcessDiscovery | None:
    """Return the discovery backend a node's settings ask to register with (etcd, a coordinator), or None."""
    if settings.etcd:
        from ..etcd import EtcdDiscovery

        return EtcdDiscovery(settings.etcd)
    if settings.coordinator_url:
        return CoordinatorDiscovery(settings.coordinator_url, auth_token=settings.auth_token)
    return None


def registration_for(settings: NodeSettings) -> SelfRegistration | None:
    """Build the self-registration a node's settings ask for, or None; it closes its backend at stop.

    Raises:
        ConfigError: registration is asked for but no advertise URL is set.
    """
    if not settings.etcd and not settings.coordinator_url:
        return None
    if not settings.advertise_url:
        raise ConfigError(
            f"{settings.source}: set PROMPTISE_ADVERTISE_URL (or advertise_url in [node]): the URL other machines "
            "reach this node at, needed to register it"
        )
    discovery = discovery_for(settings)
    assert discovery is not None  # etcd or a coordinator URL is set
    return SelfRegistration(
        discovery,
        settings.node_id,
        settings.advertise_url,
        interval=settings.heartbeat_interval,
        close_discovery=True,
    )
