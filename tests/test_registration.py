"""Self-registration (SPEC 7.4): register, heartbeat, re-register when forgotten, back off, unregister."""

from __future__ import annotations

import logging
from typing import Any

import anyio
import pytest
from support import wait_for

from promptise_asgi.config import ConfigError, NodeSettings
from promptise_asgi.discovery import CoordinatorDiscovery, RegistryDiscovery
from promptise_asgi.etcd import EtcdDiscovery
from promptise_asgi.transport._registration import SelfRegistration, discovery_for, registration_for


class FlakyBackend:
    """A discovery backend that fails on demand and records every call."""

    ttl = 0.3

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.down = False
        self.known: set[str] = set()
        self.closed = False

    async def register(self, node_id: str, url: str, metadata: dict[str, Any] | None = None) -> None:
        self.calls.append("register")
        if self.down:
            raise OSError("registry down")
        self.known.add(node_id)

    async def heartbeat(self, node_id: str) -> bool:
        self.calls.append("heartbeat")
        if self.down:
            raise OSError("registry down")
        return node_id in self.known

    async def unregister(self, node_id: str) -> None:
        self.calls.append("unregister")
        if self.down:
            raise OSError("registry down")
        self.known.discard(node_id)

    async def discover(self) -> list[Any]:
        return []

    async def aclose(self) -> None:
        self.closed = True


async def test_interval_defaults_to_a_third_of_the_ttl() -> None:
    assert SelfRegistration(FlakyBackend(), "n", "http://h").interval == pytest.approx(0.1)
    assert SelfRegistration(RegistryDiscovery(ttl=30), "n", "http://h").interval == 10
    assert SelfRegistration(object(), "n", "http://h").interval == 10  # no ttl known: 10 s
    with pytest.raises(ValueError, match="heartbeat_interval"):
        SelfRegistration(FlakyBackend(), "n", "http://h", interval=0)


async def test_heartbeats_and_re_registers_when_forgotten() -> None:
    backend = FlakyBackend()
    registration = SelfRegistration(backend, "n1", "http://h:1", interval=0.02, close_discovery=True)
    await registration.start()
    assert backend.known == {"n1"} and registration.registered
    await wait_for(lambda: backend.calls.count("heartbeat") >= 2)
    backend.known.clear()  # the registry restarted and forgot us
    await wait_for(lambda: "n1" in backend.known)
    await registration.stop()
    assert backend.calls[-1] == "unregister" and backend.known == set()
    assert backend.closed


async def test_backs_off_while_down_and_recovers(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="promptise_asgi.registration")
    backend = FlakyBackend()
    backend.down = True
    registration = SelfRegistration(backend, "n1", "http://h:1", interval=0.05)
    await registration.start()  # never raises: the node must start even if its registry is down
    assert not registration.registered
    await wait_for(lambda: backend.calls.count("register") >= 3)
    # One warning per outage, not one per retry.
    assert len([r for r in caplog.records if "could not register" in r.message]) == 1
    backend.down = False
    await wait_for(lambda: registration.registered)
    # A heartbeat failure later marks it unregistered and it registers again once the backend is back.
    backend.down = True
    await wait_for(lambda: not registration.registered)
    backend.down = False
    await wait_for(lambda: registration.registered)
    backend.down = True
    await registration.stop()  # unregister fails: logged, not raised
    assert any("could not unregister" in r.message for r in caplog.records)
    assert not backend.closed


async def test_backend_without_heartbeat_registers_again_each_round() -> None:
    class RegisterOnly:
        def __init__(self) -> None:
            self.count = 0

        async def register(self, node_id: str, url: str, metadata: Any = None) -> None:
            self.count += 1

        async def unregister(self, node_id: str) -> None:
            pass

    backend = RegisterOnly()
    registration = SelfRegistration(backend, "n1", "http://h:1", interval=0.01)
    await registration.start()
    await wait_for(lambda: backend.count >= 3)
    await registration.stop()


async def test_settings_choose_the_backend() -> None:
    assert discovery_for(NodeSettings()) is None
    assert registration_for(NodeSettings()) is None
    coordinator = discovery_for(NodeSettings(coordinator_url="http://127.0.0.1:9000", auth_token="t"))
    assert isinstance(coordinator, CoordinatorDiscovery)
    await coordinator.aclose()
    etcd = discovery_for(NodeSettings(etcd=["http://127.0.0.1:2379"]))
    assert isinstance(etcd, EtcdDiscovery)
    await etcd.aclose()
    with pytest.raises(ConfigError, match="PROMPTISE_ADVERTISE_URL"):
        registration_for(NodeSettings(coordinator_url="http://127.0.0.1:9000"))
    registration = registration_for(
        NodeSettings(
            coordinator_url="http://127.0.0.1:9000", advertise_url="http://10.0.0.5:9100", heartbeat_interval=2
        )
    )
    assert registration is not None
    assert (registration.url, registration.interval, registration.close_discovery) == ("http://10.0.0.5:9100", 2, True)
    await registration.discovery.aclose()


async def test_heartbeat_follows_the_ttl_a_coordinator_announces() -> None:
    import httpx

    from promptise_asgi.coordinator import RuntimeCoordinator, create_coordinator_app

    clock_registry = RegistryDiscovery(ttl=3.0)
    app = create_coordinator_app(RuntimeCoordinator(discovery=clock_registry))
    discovery = CoordinatorDiscovery("http://127.0.0.1", transport=httpx.ASGITransport(app=app))
    assert discovery.ttl is None
    registration = SelfRegistration(discovery, "n1", "http://127.0.0.1:9100")
    assert registration.interval == 10  # nothing known yet
    await registration.start()
    assert discovery.ttl == 3.0
    assert registration.interval == pytest.approx(1.0)
    # Still listed well past the TTL: the heartbeats came often enough (the old fixed 10 s would not).
    await anyio.sleep(4.5)
    assert len(clock_registry) == 1
    await registration.stop()
    await discovery.aclose()


async def test_an_explicit_interval_is_kept() -> None:
    registration = SelfRegistration(FlakyBackend(), "n1", "http://h:1", interval=5)
    await registration.start()
    assert registration.interval == 5
    await registration.stop()
