"""Self-registration: keep a running node registered with a discovery backend.

Registers at start, heartbeats every `interval`, registers again when a heartbeat says the backend forgot
the node (a restarted coordinator, an expired lease), backs off while the backend is unreachable, and
unregisters at stop. Failures are logged, never raised into the node: its API keeps serving regardless.
Knows the discovery Protocol, not HTTP servers.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import anyio

from .._detached import spawn_detached
from .._errors import ConfigError
from .._validation import check_seconds
from ..discovery import HasTTL, ProcessDiscovery, SupportsAclose, SupportsHeartbeat

if TYPE_CHECKING:
    from ..config import NodeSettings

__all__ = ["SelfRegistration", "discovery_for", "registration_for"]

logger = logging.getLogger("promptise_asgi.registration")

DEFAULT_INTERVAL = 10.0
MIN_BACKOFF = 0.5


class SelfRegistration:
    """Keeps `node_id` at `url` registered with `discovery` while running."""

    def __init__(
        self,
        discovery: ProcessDiscovery,
        node_id: str,
        url: str,
        *,
        interval: float | None = None,
        metadata: dict[str, Any] | None = None,
        close_discovery: bool = False,
    ) -> None:
        self._follow_ttl = interval is None
        if interval is None:
            interval = _third_of_ttl(discovery) or DEFAULT_INTERVAL
        interval = check_seconds("heartbeat_interval", interval)
        self.discovery = discovery
        self.node_id = node_id
        self.url = url
        self.interval = interval
        self.metadata = metadata
        self.close_discovery = close_discovery
        self.registered = False
        self._failing = False
        self._scope = anyio.CancelScope()
        self._finished = anyio.Event()

    async def start(self) -> None:
        """Try to register once now, then keep the registration alive in the background."""
        await self._register()
        spawn_detached(self._run, name=f"promptise-asgi registration {self.node_id}")

    async def stop(self) -> None:
        """Stop heartbeating and unregister (an unreachable backend is logged, not raised)."""
        self._scope.cancel()
        await self._finished.wait()
        try:
            with anyio.fail_after(5):
                await self.discovery.unregister(self.node_id)
        except Exception as exc:
            logger.warning("could not unregister node %s: %s", self.node_id, exc)
        if self.close_discovery and isinstance(self.discovery, SupportsAclose):
            await self.discovery.aclose()

    async def _register(self) -> bool:
        try:
            await self.discovery.register(self.node_id, self.url, self.metadata)
        except Exception as exc:
            if not self._failing:  # one warning per outage, not one per retry
                logger.warning("could not register node %s at %s: %s (retrying)", self.node_id, self.url, exc)
            self._failing = True
            self.registered = False
            return False
        if self._follow_ttl:
            # A remote registry (a coordinator) tells its TTL only when answering a registration.
            self.interval = _third_of_ttl(self.discovery) or self.interval
        if not self.registered:
            logger.info("node %s registered as %s", self.node_id, self.url)
        self._failing = False
        self.registered = True
        return True

    async def _beat(self) -> bool:
        if not self.registered or not isinstance(self.discovery, SupportsHeartbeat):
            return await self._register()
        try:
            known = await self.discovery.heartbeat(self.node_id)
        except Exception as exc:
            if not self._failing:
                logger.warning("heartbeat of node %s failed: %s (retrying)", self.node_id, exc)
            self._failing = True
            self.registered = False
            return False
        if known is False:
            logger.info("discovery forgot node %s; registering again", self.node_id)
            return await self._register()
        return True

    async def _run(self) -> None:
        try:
            with self._scope:
                backoff = MIN_BACKOFF
                delay = self.interval if self.registered else backoff
                while True:
                    await anyio.sleep(delay)
                    if await self._beat():
                        backoff, delay = MIN_BACKOFF, self.interval
                    else:
                        delay = backoff
                        backoff = min(backoff * 2, self.interval)
        finally:
            self._finished.set()


def _third_of_ttl(discovery: ProcessDiscovery) -> float | None:
    ttl = discovery.ttl if isinstance(discovery, HasTTL) else None
    return None if ttl is None else ttl / 3


def discovery_for(settings: NodeSettings) -> ProcessDiscovery | None:
    """Return the discovery backend a node's settings ask to register with (etcd, a coordinator), or None."""
    if settings.etcd:
        from ..etcd import EtcdDiscovery

        return EtcdDiscovery(settings.etcd)
    if settings.coordinator_url:
        from ..discovery import CoordinatorDiscovery

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
