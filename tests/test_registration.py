"""Self-registration (SPEC 7.4, 19): register in the background, heartbeat, re-register when forgotten, back
off, unregister; trouble explained in the log and in the node's /status; never advertise loopback to a remote
coordinator from a wildcard address."""

from __future__ import annotations

import logging
import socket
from typing import Any

import anyio
import httpx
import pytest
from support import dead_url, wait_for

from promptise_asgi._errors import CoordinatorError, CoordinatorUnreachableError, EtcdUnavailableError
from promptise_asgi.config import ConfigError, NodeSettings
from promptise_asgi.coordinator import RuntimeCoordinator, create_coordinator_app
from promptise_asgi.discovery import CoordinatorDiscovery, RegistryDiscovery
from promptise_asgi.etcd import EtcdDiscovery
from promptise_asgi.runtime import AgentRuntime, ProcessConfig
from promptise_asgi.transport import RuntimeTransport, _registration
from promptise_asgi.transport._registration import SelfRegistration, discovery_for, registration_for, registration_url


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
    await wait_for(lambda: registration.registered, what="the first registration")
    assert backend.known == {"n1"} and registration.status()["state"] == "registered"
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
    # One warning for the outage, not one per retry (REPEAT_LOG_SECONDS apart at most).
    warnings = [r for r in caplog.records if "is not registered: registry down" in r.message]
    assert len(warnings) == 1 and warnings[0].levelno == logging.WARNING
    assert (registration.state, registration.last_error) == ("unreachable", "registry down")
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
    await wait_for(lambda: registration.registered)
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


class Silent(FlakyBackend):
    """A backend that never answers a registration (a black-holed coordinator)."""

    async def register(self, node_id: str, url: str, metadata: dict[str, Any] | None = None) -> None:
        self.calls.append("register")
        await anyio.sleep_forever()


async def test_a_silent_backend_never_delays_the_start_or_the_stop() -> None:
    backend = Silent()
    registration = SelfRegistration(backend, "n1", "http://h:1", interval=5)
    with anyio.fail_after(1):
        await registration.start()
        await wait_for(lambda: backend.calls == ["register"])
        assert registration.status() == {
            "coordinator": "Silent",
            "url": "http://h:1",
            "state": "registering",
            "last_error": None,
        }
        await registration.stop()
    assert backend.calls == ["register"]  # never registered: nothing to unregister, nothing to wait for
    assert registration.state == "stopped"


class Refusing(FlakyBackend):
    """A backend that fails every registration with `error` (while it is not None)."""

    endpoints = ("http://10.0.0.2:9000",)
    description = "http://10.0.0.2:9000"

    def __init__(self, error: Exception) -> None:
        super().__init__()
        self.error: Exception | None = error

    async def register(self, node_id: str, url: str, metadata: dict[str, Any] | None = None) -> None:
        self.calls.append("register")
        if self.error is not None:
            raise self.error
        self.known.add(node_id)


COORDINATOR = "http://10.0.0.2:9000"


@pytest.mark.parametrize(
    ("error", "state", "level", "advice"),
    [
        (
            CoordinatorError(401, "Unauthorized", COORDINATOR + "/cluster/nodes", COORDINATOR),
            "refused",
            logging.ERROR,
            "the coordinator refused this node's token; set PROMPTISE_AUTH_TOKEN to the coordinator's node token",
        ),
        (
            CoordinatorError(403, "Remote request refused: this coordinator has no token", "", COORDINATOR),
            "refused",
            logging.ERROR,
            "give it a node token (PROMPTISE_NODE_TOKEN) and set PROMPTISE_AUTH_TOKEN here to the same value",
        ),
        (
            CoordinatorError(409, "Node 'n1' is registered at another URL", "", COORDINATOR),
            "refused",
            logging.ERROR,
            "a live node 'n1' registered at another URL; give this node another id (--node-id, PROMPTISE_NODE_ID)",
        ),
        (
            CoordinatorError(422, "url host 'h' does not resolve", "", COORDINATOR),
            "refused",
            logging.ERROR,
            "will not register this node as http://h:1; set the URL other machines reach it at with --advertise-url",
        ),
        (
            CoordinatorError(503, "discovery unavailable: etcd down", "", COORDINATOR),
            "unavailable",
            logging.WARNING,
            "the coordinator cannot take registrations now (coordinator at http://10.0.0.2:9000 answered 503",
        ),
        (CoordinatorError(500, "Internal Server Error", "", COORDINATOR), "refused", logging.ERROR, "answered 500"),
        (
            CoordinatorUnreachableError(COORDINATOR, "connection refused"),
            "unreachable",
            logging.WARNING,
            "coordinator unreachable at http://10.0.0.2:9000 (connection refused)",
        ),
        (EtcdUnavailableError(["http://e:2379"], "refused"), "unreachable", logging.WARNING, "etcd unavailable"),
        (TimeoutError(), "unreachable", logging.WARNING, "TimeoutError"),
        (RuntimeError("a bug"), "failing", logging.ERROR, "RuntimeError: a bug"),
    ],
)
async def test_trouble_says_what_to_do(
    error: Exception, state: str, level: int, advice: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="promptise_asgi.registration")
    registration = SelfRegistration(Refusing(error), "n1", "http://h:1", interval=5)
    await registration.start()
    await wait_for(lambda: registration.state != "registering")
    await registration.stop()
    assert [r.levelno for r in caplog.records] == [level]
    assert advice in caplog.records[0].message and caplog.records[0].message.startswith("node n1 is not registered: ")
    assert registration.last_error is not None and advice in registration.last_error


class ManualClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


async def test_lasting_trouble_is_logged_again_at_a_slow_cadence(caplog: pytest.LogCaptureFixture) -> None:
    """Not once and then silence: again every REPEAT_LOG_SECONDS while it lasts, and its end is logged."""
    caplog.set_level(logging.INFO, logger="promptise_asgi.registration")
    backend = Refusing(CoordinatorError(401, "Unauthorized", "", COORDINATOR))
    clock = ManualClock()
    registration = SelfRegistration(backend, "n1", "http://h:1", interval=0.01, clock=clock)

    def errors() -> list[str]:
        return [r.message for r in caplog.records if r.levelno == logging.ERROR]

    await registration.start()
    await wait_for(lambda: backend.calls.count("register") >= 3)
    assert len(errors()) == 1
    clock.now = _registration.REPEAT_LOG_SECONDS + 1
    await wait_for(lambda: len(errors()) == 2, what="the trouble logged again")
    assert errors()[1].endswith("; failing for 61s, retrying")
    await wait_for(lambda: backend.calls.count("register") >= 6)
    assert len(errors()) == 2
    backend.error = CoordinatorUnreachableError(COORDINATOR, "connection refused")  # another trouble: at once
    await wait_for(lambda: registration.state == "unreachable")
    backend.error = None
    await wait_for(lambda: registration.registered)
    await registration.stop()
    assert any(
        "registered with http://10.0.0.2:9000 as http://h:1 after 61s of trouble" in r.message for r in caplog.records
    )


async def test_a_refused_token_is_shown_in_the_nodes_status() -> None:
    coordinator = RuntimeCoordinator(discovery=RegistryDiscovery(ttl=30), auth_token="node-token")
    app = create_coordinator_app(coordinator)
    discovery = CoordinatorDiscovery("http://127.0.0.1:9000", "wrong", transport=httpx.ASGITransport(app=app))
    runtime = AgentRuntime()
    await runtime.add_process("worker", ProcessConfig())
    async with RuntimeTransport(runtime, port=0, node_id="n1", discovery=discovery) as node:
        url = node.url
        async with httpx.AsyncClient(base_url=url) as client:
            await wait_for_state(client, "refused")
            registration = (await client.get("/status")).json()["registration"]
    assert registration["coordinator"] == "http://127.0.0.1:9000" and registration["url"] == url
    assert registration["last_error"].startswith("the coordinator refused this node's token; set PROMPTISE_AUTH_TOKEN")
    await discovery.aclose()
    await coordinator.aclose()


async def wait_for_state(client: httpx.AsyncClient, state: str) -> None:
    async def check() -> bool:
        return bool((await client.get("/status")).json()["registration"]["state"] == state)

    from support import wait_for_async

    await wait_for_async(check, what=f"registration state {state!r}")


async def test_a_dead_coordinator_is_named_as_the_coordinator_in_the_nodes_status() -> None:
    url = dead_url()
    runtime = AgentRuntime()
    async with (
        CoordinatorDiscovery(url, timeout=1) as discovery,
        RuntimeTransport(runtime, port=0, node_id="n1", discovery=discovery) as node,
        httpx.AsyncClient(base_url=node.url) as client,
    ):
        await wait_for_state(client, "unreachable")
        registration = (await client.get("/status")).json()["registration"]
    assert registration["last_error"].startswith(f"coordinator unreachable at {url} (")
    assert "node unreachable" not in registration["last_error"]


# -- the URL a node registers under -----------------------------------------------------------------------


class Remote:
    endpoints = ("http://10.9.9.9:9000",)
    description = "http://10.9.9.9:9000"


class LocalEtcd:
    endpoints = ("http://127.0.0.1:2379", "http://localhost:2380")
    description = "etcd http://127.0.0.1:2379, http://localhost:2380"


async def test_a_node_on_one_address_registers_the_url_it_serves() -> None:
    bound = "http://10.0.0.5:9100"
    assert await registration_url(bound, "10.0.0.5", Remote(), "n1") == bound
    in_process = RegistryDiscovery()
    assert await registration_url("http://127.0.0.1:9100", "0.0.0.0", in_process, "n1") == "http://127.0.0.1:9100"
    # A coordinator (or etcd) on this machine reaches the loopback URL.
    for local in (CoordinatorDiscovery("http://127.0.0.1:9000"), LocalEtcd()):
        assert await registration_url("http://127.0.0.1:9100", "0.0.0.0", local, "n1") == "http://127.0.0.1:9100"


async def test_loopback_only_with_a_remote_coordinator_is_warned_about(caplog: pytest.LogCaptureFixture) -> None:
    assert await registration_url("http://127.0.0.1:9100", "127.0.0.1", Remote(), "n1") == "http://127.0.0.1:9100"
    assert "listens on loopback only (http://127.0.0.1:9100) but registers with http://10.9.9.9:9000" in caplog.text


async def test_a_wildcard_node_registers_under_this_machines_name(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="promptise_asgi.registration")
    monkeypatch.setattr(socket, "getfqdn", lambda: "box.example.com")
    for host in ("0.0.0.0", "::", ""):
        url = await registration_url("http://127.0.0.1:9100", host, Remote(), "n1")
        assert url == "http://box.example.com:9100"
    assert "registers with http://10.9.9.9:9000 as http://box.example.com:9100, from this machine's hostname" in (
        caplog.text
    )


async def test_a_hostname_that_means_loopback_gives_way_to_the_routed_address(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="promptise_asgi.registration")
    monkeypatch.setattr(socket, "getfqdn", lambda: "localhost")  # Debian maps the hostname to 127.0.1.1
    monkeypatch.setattr(_registration, "_route_address", lambda host: "10.0.0.7" if host == "10.9.9.9" else None)
    assert await registration_url("http://[::1]:9100", "::", Remote(), "n1") == "http://10.0.0.7:9100"
    assert "from this machine's address on the route to 10.9.9.9" in caplog.text
    monkeypatch.setattr(_registration, "_route_address", lambda host: "fd00::7")
    assert await registration_url("https://127.0.0.1:9443", "0.0.0.0", Remote(), "n1") == "https://[fd00::7]:9443"
    monkeypatch.setattr(_registration, "_route_address", lambda host: None)
    with pytest.raises(ValueError, match=r"no name or address .* set advertise_url \(--advertise-url"):
        await registration_url("http://127.0.0.1:9100", "0.0.0.0", Remote(), "n1")


def test_the_routed_address_is_never_loopback() -> None:
    from support import non_loopback_address

    assert _registration._route_address("127.0.0.1") is None
    assert _registration._route_address("no-such-host.invalid") is None
    address = non_loopback_address()
    if address is not None:
        assert _registration._route_address(address) == address


async def test_a_wildcard_transport_advertises_the_derived_url(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(socket, "getfqdn", lambda: "box.example.com")

    class RemoteBackend(FlakyBackend):
        endpoints = ("http://10.9.9.9:9000",)
        description = "http://10.9.9.9:9000"

    backend = RemoteBackend()
    transport = RuntimeTransport(AgentRuntime(), "0.0.0.0", 0, "n1", auth_token="t", discovery=backend)
    assert transport.advertised_url is None
    async with transport:
        assert transport.advertised_url == f"http://box.example.com:{transport.port}"
        await wait_for(lambda: "n1" in backend.known)
