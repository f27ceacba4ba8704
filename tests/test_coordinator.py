"""The coordinator (SPEC 7.4, 8): health, flap damping, remote control, broadcast, its HTTP app, and
nodes that register themselves, with real nodes on loopback sockets (uvicorn on asyncio, hypercorn on trio)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import httpx
import pytest
from support import black_hole, dead_url, wait_for

from promptise_asgi._validation import derive_idempotency_key
from promptise_asgi.client import NodeError, NodeTimeoutError, NodeUnreachableError
from promptise_asgi.coordinator import NodeInfo, RuntimeCoordinator, create_coordinator_app
from promptise_asgi.discovery import CoordinatorDiscovery, RegistryDiscovery, StaticDiscovery
from promptise_asgi.runtime import AgentRuntime, ProcessConfig, TriggerEvent
from promptise_asgi.transport import AppServer, RuntimeTransport

BASE = "http://127.0.0.1"


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@asynccontextmanager
async def node(
    node_id: str, *, port: int = 0, token: str | None = None, **transport_options: Any
) -> AsyncIterator[tuple[RuntimeTransport, list[TriggerEvent]]]:
    events: list[TriggerEvent] = []

    async def handler(event: TriggerEvent) -> None:
        events.append(event)

    runtime = AgentRuntime()
    await runtime.add_process("worker", ProcessConfig(handler=handler))
    async with RuntimeTransport(runtime, port=port, node_id=node_id, auth_token=token, **transport_options) as t:
        yield t, events


class TestNodeTable:
    def test_register_get_unregister(self) -> None:
        coordinator = RuntimeCoordinator()
        info = coordinator.register_node("n1", "http://127.0.0.1:9100/", {"zone": "a"})
        assert isinstance(info, NodeInfo)
        assert info.url == "http://127.0.0.1:9100"
        assert coordinator.get_node("n1") is info
        assert list(coordinator.nodes) == ["n1"]
        coordinator.unregister_node("n1")
        with pytest.raises(KeyError, match="Node 'n1' not registered"):
            coordinator.get_node("n1")
        with pytest.raises(KeyError, match="not registered"):
            coordinator.unregister_node("n1")

    def test_re_register_keeps_health_unless_the_url_changes(self) -> None:
        coordinator = RuntimeCoordinator()
        info = coordinator.register_node("n1", "http://127.0.0.1:1")
        info.status = "healthy"
        same = coordinator.register_node("n1", "http://127.0.0.1:1", {"v": 2})
        assert same is info and same.status == "healthy" and same.metadata == {"v": 2}
        moved = coordinator.register_node("n1", "http://127.0.0.1:2")
        assert moved.status == "unknown"

    @pytest.mark.parametrize(
        ("args", "match"),
        [(("-bad", "http://h"), "node_id"), (("ok", "ftp://h"), "url"), (("ok", "http://h", [1]), "metadata")],
    )
    def test_validation(self, args: tuple[Any, ...], match: str) -> None:
        with pytest.raises(ValueError, match=match):
            RuntimeCoordinator().register_node(*args)

    @pytest.mark.parametrize(
        "kwargs",
        [
            {"health_check_interval": 0},
            {"node_timeout": -1},
            {"request_timeout": float("inf")},
            {"max_concurrency": 0},
            {"auth_token": " "},
        ],
    )
    def test_bad_settings(self, kwargs: dict[str, Any]) -> None:
        with pytest.raises(ValueError):
            RuntimeCoordinator(**kwargs)

    def test_tokens_never_appear_in_output(self) -> None:
        coordinator = RuntimeCoordinator(auth_token="cluster-secret")
        info = coordinator.register_node("n1", "http://127.0.0.1:1", auth_token="node-secret")
        assert "secret" not in repr(info) and "secret" not in str(info.to_dict())
        assert "secret" not in repr(coordinator)


class TestHealth:
    async def test_healthy_dead_and_black_holed_nodes(self) -> None:
        coordinator = RuntimeCoordinator(request_timeout=0.5)
        async with node("alive") as (alive, _):
            coordinator.register_node("alive", alive.url)
            coordinator.register_node("dead", dead_url())
            with black_hole() as silent:
                coordinator.register_node("silent", silent)
                started = anyio.current_time()
                status = await coordinator.cluster_status()
                elapsed = anyio.current_time() - started
        await coordinator.aclose()
        # The black-holed node costs one request_timeout, not a fixed multi-second wait.
        assert elapsed < 5
        assert status["total_nodes"] == 3
        assert status["healthy_nodes"] == 1 and status["unhealthy_nodes"] == 2
        assert status["total_processes"] == 1
        nodes = status["nodes"]
        assert nodes["alive"]["status"] == "healthy"
        assert nodes["alive"]["health"] == {"status": "healthy", "node_id": "alive", "process_count": 1}
        assert nodes["dead"]["status"] == "unhealthy" and "unreachable" in nodes["dead"]["health"]["error"]
        assert nodes["silent"]["status"] == "unhealthy" and "timed out" in nodes["silent"]["health"]["error"]

    async def test_missed_checks_are_damped_until_node_timeout_and_recovery(self) -> None:
        clock = FakeClock()
        coordinator = RuntimeCoordinator(node_timeout=45, request_timeout=2, clock=clock)
        async with node("n1") as (first, _):
            port = first.port
            coordinator.register_node("n1", first.url)
            await coordinator.check_health()
            assert coordinator.get_node("n1").status == "healthy"
        # The node is gone: inside node_timeout it stays healthy, flagged.
        clock.now += 10
        await coordinator.check_health()
        info = coordinator.get_node("n1")
        assert info.status == "healthy" and info.missed_checks == 1
        assert info.to_dict()["missed_check"] is True
        clock.now += 40
        await coordinator.check_health()
        assert coordinator.get_node("n1").status == "unhealthy"
        # It comes back on the same port: healthy again at the next check.
        async with node("n1", port=port):
            await coordinator.check_health()
            assert coordinator.get_node("n1").status == "healthy"
            assert coordinator.get_node("n1").missed_checks == 0
        await coordinator.aclose()

    async def test_monitor_checks_in_the_background(self) -> None:
        async with node("n1") as (n1, _):
            async with RuntimeCoordinator(health_check_interval=0.05) as coordinator:
                coordinator.register_node("n1", n1.url)
                await wait_for(lambda: coordinator.get_node("n1").status == "healthy")
                assert coordinator.healthy_nodes == ["n1"]

    async def test_cluster_token_and_per_node_token(self) -> None:
        async with node("a", token="ta") as (a, _), node("b", token="tb") as (b, _):
            coordinator = RuntimeCoordinator(auth_token="ta")
            coordinator.register_node("a", a.url)
            coordinator.register_node("b", b.url, auth_token="tb")
            await coordinator.start_process_on_node("a", "worker")
            await coordinator.start_process_on_node("b", "worker")
            coordinator.register_node("c", b.url.replace("127.0.0.1", "localhost"))
            with pytest.raises(NodeError) as info:
                await coordinator.start_process_on_node("c", "worker")
            assert info.value.status_code == 401
            await coordinator.aclose()


class TestDiscoveryBackends:
    async def test_nodes_come_and_go_with_the_registry(self) -> None:
        clock = FakeClock()
        registry = RegistryDiscovery(ttl=30, clock=clock)
        coordinator = RuntimeCoordinator(discovery=registry, request_timeout=0.5)
        coordinator.register_node("pinned", dead_url())
        await registry.register("d1", "http://127.0.0.1:1")
        await coordinator.sync_discovery()
        assert set(coordinator.nodes) == {"pinned", "d1"}
        assert coordinator.get_node("d1").source == "discovered"
        clock.now += 31
        await coordinator.sync_discovery()
        assert set(coordinator.nodes) == {"pinned"}
        await coordinator.aclose()

    async def test_a_failing_backend_keeps_the_table(self) -> None:
        class Broken(StaticDiscovery):
            fail = False

            async def discover(self) -> Any:
                if self.fail:
                    raise OSError("etcd is down")
                return await super().discover()

        backend = Broken({"n1": "http://127.0.0.1:1"})
        coordinator = RuntimeCoordinator(discovery=backend)
        await coordinator.sync_discovery()
        backend.fail = True
        await coordinator.sync_discovery()
        assert list(coordinator.nodes) == ["n1"]


class TestRemoteControl:
    async def test_start_stop_restart_inject(self) -> None:
        async with node("n1") as (n1, events):
            coordinator = RuntimeCoordinator()
            coordinator.register_node("n1", n1.url)
            assert await coordinator.stop_process_on_node("n1", "worker") == {
                "status": "stopped",
                "name": "worker",
                "changed": True,
            }
            assert (await coordinator.start_process_on_node("n1", "worker"))["changed"] is True
            assert (await coordinator.start_process_on_node("n1", "worker"))["changed"] is False
            assert (await coordinator.restart_process_on_node("n1", "worker"))["status"] == "restarted"
            answer = await coordinator.inject_event_on_node(
                "n1", "worker", {"k": 1}, trigger_type="cron", metadata={"m": 1}
            )
            assert answer["status"] == "injected"
            await wait_for(lambda: len(events) == 1)
            assert (events[0].payload, events[0].trigger_type, events[0].metadata) == ({"k": 1}, "cron", {"m": 1})
            with pytest.raises(NodeError) as missing:
                await coordinator.start_process_on_node("n1", "nope")
            assert missing.value.status_code == 404 and missing.value.message == "Process 'nope' not found"
            with pytest.raises(KeyError, match="ghost"):
                await coordinator.start_process_on_node("ghost", "worker")
            coordinator.register_node("dead", dead_url())
            with pytest.raises(NodeUnreachableError):
                await coordinator.stop_process_on_node("dead", "worker")
            await coordinator.aclose()

    async def test_broadcast_answers_for_every_target(self) -> None:
        coordinator = RuntimeCoordinator(request_timeout=0.5)
        async with node("a") as (a, a_events), node("b") as (b, b_events):
            coordinator.register_node("a", a.url)
            coordinator.register_node("b", b.url)
            coordinator.register_node("dead", dead_url())
            with black_hole() as silent:
                coordinator.register_node("silent", silent)
                results = await coordinator.broadcast_event("worker", {"x": 1})
            await wait_for(lambda: len(a_events) == 1 and len(b_events) == 1)
            assert list(results) == ["a", "b", "dead", "silent"]
            assert results["a"]["status"] == "injected" and results["b"]["status"] == "injected"
            assert results["dead"]["unreachable"] is True and "error" in results["dead"]
            assert results["silent"]["timeout"] is True
            only = await coordinator.broadcast_event("nope", {}, node_ids=["a", "ghost"])
            assert only == {
                "a": {"error": "Process 'nope' not found", "status_code": 404},
                "ghost": {"error": "Node 'ghost' not registered", "status_code": 404},
            }
        await coordinator.aclose()


def app_client(app: Any, **kwargs: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app, raise_app_exceptions=False), base_url=BASE, **kwargs
    )


class TestCoordinatorApp:
    async def test_registry_endpoints(self) -> None:
        clock = FakeClock()
        coordinator = RuntimeCoordinator(discovery=RegistryDiscovery(ttl=30, clock=clock))
        async with app_client(create_coordinator_app(coordinator)) as client:
            assert (await client.get("/health")).json() == {"status": "healthy", "role": "coordinator", "node_count": 0}
            registered = await client.post(
                "/cluster/nodes", json={"node_id": "n1", "url": "http://127.0.0.1:1/", "metadata": {"z": 1}}
            )
            assert registered.json() == {
                "status": "registered",
                "node_id": "n1",
                "url": "http://127.0.0.1:1",
                "ttl": 30.0,
                "heartbeat_interval": 10.0,  # a third of the TTL: less than 2/3 of the 15 s health check interval
            }
            listed = (await client.get("/cluster/nodes")).json()
            assert listed["count"] == 1 and listed["nodes"][0]["metadata"] == {"z": 1}
            assert (await client.post("/cluster/nodes/n1/heartbeat")).json() == {"status": "ok", "node_id": "n1"}
            clock.now += 31
            expired = await client.post("/cluster/nodes/n1/heartbeat")
            assert expired.status_code == 404 and expired.json() == {"error": "Node 'n1' not registered"}
            assert (await client.get("/cluster/nodes")).json() == {"nodes": [], "count": 0, "total": 0, "next": None}
            await client.post("/cluster/nodes", json={"node_id": "n2", "url": "http://127.0.0.1:2"})
            assert (await client.delete("/cluster/nodes/n2")).json() == {"status": "unregistered", "node_id": "n2"}
            again = await client.delete("/cluster/nodes/n2")
            assert again.status_code == 404 and again.json() == {"error": "Node 'n2' not registered"}

    async def test_registry_without_a_discovery_backend(self) -> None:
        coordinator = RuntimeCoordinator()
        async with app_client(create_coordinator_app(coordinator)) as client:
            await client.post("/cluster/nodes", json={"node_id": "n1", "url": "http://127.0.0.1:1"})
            assert coordinator.get_node("n1").source == "registered"
            assert (await client.post("/cluster/nodes/n1/heartbeat")).status_code == 200
            assert (await client.post("/cluster/nodes/zz/heartbeat")).status_code == 404
            assert (await client.delete("/cluster/nodes/n1")).status_code == 200

    @pytest.mark.parametrize(
        ("body", "code", "error"),
        [
            ({"node_id": "-bad", "url": "http://h"}, 422, "node_id must match ^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$"),
            ({"url": "http://h"}, 422, "node_id must match ^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$"),
            ({"node_id": "x", "url": "ftp://h/"}, 422, "url must be an http(s) URL with a host, got 'ftp://h/'"),
            ({"node_id": "x"}, 422, "url must be an http(s) URL"),
            ({"node_id": "x", "url": "http://h", "metadata": [1]}, 422, "metadata must be a JSON object"),
            (b"nope", 400, "Invalid JSON body"),
            (b"[1]", 400, "Body must be a JSON object"),
        ],
    )
    async def test_register_validation(self, body: Any, code: int, error: str) -> None:
        coordinator = RuntimeCoordinator()
        async with app_client(create_coordinator_app(coordinator)) as client:
            if isinstance(body, bytes):
                response = await client.post("/cluster/nodes", content=body)
            else:
                response = await client.post("/cluster/nodes", json=body)
        assert response.status_code == code
        assert response.json() == {"error": error}
        assert not coordinator.nodes

    async def test_proxied_control_passes_errors_through(self) -> None:
        coordinator = RuntimeCoordinator(request_timeout=0.5)
        async with node("n1") as (n1, events), app_client(create_coordinator_app(coordinator)) as client:
            coordinator.register_node("n1", n1.url)
            coordinator.register_node("dead", dead_url())
            assert (await client.post("/cluster/nodes/n1/processes/worker/stop")).json()["changed"] is True
            assert (await client.post("/cluster/nodes/n1/processes/worker/start")).json()["status"] == "started"
            assert (await client.post("/cluster/nodes/n1/processes/worker/restart")).json()["status"] == "restarted"
            injected = await client.post(
                "/cluster/nodes/n1/processes/worker/event",
                json={"payload": {"v": 1}, "trigger_id": "t", "trigger_type": "x"},
            )
            assert injected.status_code == 202 and injected.json()["status"] == "injected"
            await wait_for(lambda: len(events) == 1)
            assert (events[0].trigger_id, events[0].trigger_type) == ("t", "x")
            missing = await client.post("/cluster/nodes/n1/processes/nope/start")
            assert missing.status_code == 404 and missing.json() == {"error": "Process 'nope' not found"}
            bad = await client.post("/cluster/nodes/n1/processes/worker/event", json={"payload": "no"})
            assert bad.status_code == 400 and bad.json() == {"error": "payload must be a JSON object"}
            ghost = await client.post("/cluster/nodes/ghost/processes/worker/start")
            assert ghost.status_code == 404 and ghost.json() == {"error": "Node 'ghost' not registered"}
            down = await client.post("/cluster/nodes/dead/processes/worker/start")
            assert down.status_code == 502 and "unreachable" in down.json()["error"]
            with black_hole() as silent:
                coordinator.register_node("silent", silent)
                slow = await client.post("/cluster/nodes/silent/processes/worker/start")
            assert slow.status_code == 504 and "error" in slow.json()
            status = (await client.get("/cluster/status")).json()
            assert status["total_nodes"] == 3 and status["healthy_nodes"] == 1
        await coordinator.aclose()

    async def test_broadcast_route(self) -> None:
        coordinator = RuntimeCoordinator(request_timeout=0.5)
        async with node("a") as (a, events), app_client(create_coordinator_app(coordinator)) as client:
            coordinator.register_node("a", a.url)
            coordinator.register_node("dead", dead_url())
            response = await client.post("/cluster/processes/worker/event", json={"payload": {"b": 1}})
            body = response.json()
            assert body["process"] == "worker"
            assert body["results"]["a"]["status"] == "injected" and body["results"]["dead"]["unreachable"] is True
            await wait_for(lambda: len(events) == 1)
            targeted = await client.post("/cluster/processes/worker/event", json={"node_ids": ["a"], "payload": {}})
            assert list(targeted.json()["results"]) == ["a"]
            bad = await client.post("/cluster/processes/worker/event", json={"node_ids": "a"})
            assert bad.status_code == 400
        await coordinator.aclose()

    async def test_auth_like_a_node(self) -> None:
        app = create_coordinator_app(RuntimeCoordinator(), auth_token="ct")
        async with app_client(app) as client:
            assert (await client.get("/health")).status_code == 200
            for method, path in [("GET", "/cluster/status"), ("GET", "/cluster/nodes"), ("POST", "/cluster/nodes")]:
                response = await client.request(method, path)
                assert response.status_code == 401 and response.headers["www-authenticate"] == "Bearer"
            ok = await client.get("/cluster/nodes", headers={"Authorization": "Bearer ct"})
            assert ok.status_code == 200
        open_app = create_coordinator_app(RuntimeCoordinator())
        async with app_client(open_app) as client:
            assert (await client.get("/cluster/nodes", headers={"Host": "evil.example"})).status_code == 421


class TestSelfRegistration:
    async def test_coordinator_discovery_round_trip(self) -> None:
        coordinator = RuntimeCoordinator(discovery=RegistryDiscovery(ttl=30))
        transport = httpx.ASGITransport(app=create_coordinator_app(coordinator, auth_token="ct"))
        async with CoordinatorDiscovery(BASE, auth_token="ct", transport=transport) as discovery:
            await discovery.register("n1", "http://127.0.0.1:9100/", {"zone": "a"})
            nodes = await discovery.discover()
            assert [(n.node_id, n.url, n.metadata) for n in nodes] == [("n1", "http://127.0.0.1:9100", {"zone": "a"})]
            assert await discovery.heartbeat("n1") is True
            assert await discovery.heartbeat("other") is False
            await discovery.unregister("n1")
            await discovery.unregister("n1")  # unknown: a no-op
            assert await discovery.discover() == []
        wrong = CoordinatorDiscovery(BASE, auth_token="nope", transport=transport)
        with pytest.raises(NodeError) as info:
            await wrong.heartbeat("n1")
        assert info.value.status_code == 401
        await wrong.aclose()

    async def test_node_registers_heartbeats_survives_a_coordinator_restart_and_unregisters(self) -> None:
        registry = RegistryDiscovery(ttl=30)
        coordinator = RuntimeCoordinator(discovery=registry)
        coord_app = create_coordinator_app(coordinator)
        host = AppServer(coord_app, port=0)
        await host.start()
        try:
            discovery = CoordinatorDiscovery(host.url)
            async with node("n1", discovery=discovery, heartbeat_interval=0.05) as (n1, _):
                await wait_for(lambda: len(registry) == 1)
                assert (await registry.discover())[0].url == n1.url
                # The coordinator forgets the node (as after a restart): the next heartbeat re-registers it.
                await registry.unregister("n1")
                await wait_for(lambda: len(registry) == 1)
            # Stopping the node unregisters it.
            assert len(registry) == 0
            await discovery.aclose()
        finally:
            await host.stop()

    async def test_a_restarted_coordinator_is_healed_by_re_registration(self) -> None:
        first = RuntimeCoordinator(discovery=RegistryDiscovery(ttl=30))
        server = AppServer(create_coordinator_app(first), port=0)
        await server.start()
        port = server.port
        discovery = CoordinatorDiscovery(server.url, timeout=1)
        async with node("n1", discovery=discovery, heartbeat_interval=0.05) as (n1, _):
            await wait_for(lambda: len(first.discovery) == 1)  # registered in the background
            await first.sync_discovery()
            assert list(first.nodes) == ["n1"]
            await server.stop()
            # A new coordinator process on the same address, with an empty registry.
            second = RuntimeCoordinator(discovery=RegistryDiscovery(ttl=30))
            server = AppServer(create_coordinator_app(second), port=port)
            await server.start()
            try:
                with anyio.fail_after(15):
                    while "n1" not in second.nodes:
                        await anyio.sleep(0.05)
                        await second.sync_discovery()
                assert second.get_node("n1").url == n1.url
            finally:
                await server.stop()
        await discovery.aclose()

    async def test_node_keeps_serving_while_the_coordinator_is_down(self) -> None:
        discovery = CoordinatorDiscovery(dead_url(), timeout=0.5)
        async with node("n1", discovery=discovery, heartbeat_interval=0.05) as (n1, _):
            async with httpx.AsyncClient() as client:
                for _ in range(3):
                    assert (await client.get(f"{n1.url}/health")).status_code == 200
                    await anyio.sleep(0.05)
        await discovery.aclose()


async def test_timeout_error_is_also_unreachable() -> None:
    assert issubclass(NodeTimeoutError, NodeUnreachableError)


class TestIdempotencyKeys:
    """SPEC 12: the coordinator passes a key through, and gives each node its own key on broadcast."""

    async def test_a_key_passes_through_and_a_broadcast_derives_one_per_node(self) -> None:
        coordinator = RuntimeCoordinator()
        async with node("a") as (a, a_events), node("b") as (b, b_events):
            coordinator.register_node("a", a.url)
            coordinator.register_node("b", b.url)
            first = await coordinator.inject_event_on_node("a", "worker", {"n": 1}, idempotency_key="once")
            again = await coordinator.inject_event_on_node("a", "worker", {"n": 1}, idempotency_key="once")
            assert again == first
            sent = await coordinator.broadcast_event("worker", {"n": 2}, idempotency_key="wave-1")
            resent = await coordinator.broadcast_event("worker", {"n": 2}, idempotency_key="wave-1")
            assert resent == sent and sent["a"]["event_id"] != sent["b"]["event_id"]
            # "a" already used "once" for another body: the derived key of "wave-1" for "a" is not "once".
            await wait_for(lambda: len(a_events) == 2 and len(b_events) == 1)
            assert derive_idempotency_key("wave-1", "a") != derive_idempotency_key("wave-1", "b")
        await coordinator.aclose()

    async def test_the_routes_read_the_header(self) -> None:
        coordinator = RuntimeCoordinator()
        async with node("a") as (a, events), app_client(create_coordinator_app(coordinator)) as client:
            coordinator.register_node("a", a.url)
            headers = {"Idempotency-Key": "k1"}
            one = await client.post("/cluster/nodes/a/processes/worker/event", json={}, headers=headers)
            two = await client.post("/cluster/nodes/a/processes/worker/event", json={}, headers=headers)
            assert one.status_code == two.status_code == 202 and one.json() == two.json()
            clash = await client.post(
                "/cluster/nodes/a/processes/worker/event", json={"payload": {"x": 1}}, headers=headers
            )
            assert clash.status_code == 422
            wave = [
                (await client.post("/cluster/processes/worker/event", json={}, headers=headers)).json() for _ in "12"
            ]
            assert wave[0] == wave[1]
            bad = await client.post(
                "/cluster/processes/worker/event", json={}, headers=[(b"idempotency-key", "é".encode())]
            )
            assert bad.status_code == 400 and "Idempotency-Key" in bad.json()["error"]
            await wait_for(lambda: len(events) == 2)
        await coordinator.aclose()
