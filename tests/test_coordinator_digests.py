"""Heartbeat digests (SPEC 16): the route, nodes healthy from their heartbeats and not polled while a digest is
fresh, node_timeout from the last heartbeat, and self-registration sending digests end to end."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
from support import ManualClock, changes_so_far, counting_black_hole, dead_url, wait_for

from promptise_asgi.coordinator import RuntimeCoordinator, create_coordinator_app
from promptise_asgi.coordinator._digest import Digest, parse_digest
from promptise_asgi.discovery import CoordinatorDiscovery, RegistryDiscovery
from promptise_asgi.runtime import AgentRuntime, ProcessConfig
from promptise_asgi.transport import AppServer, RuntimeTransport
from promptise_asgi.transport._registration import SelfRegistration

BASE = "http://127.0.0.1"
DIGEST = {"process_count": 2, "processes": [{"name": "a", "state": "running", "queue_size": 3},
                                             {"name": "b", "state": "stopped"}]}  # fmt: skip


def app_client(app: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app, raise_app_exceptions=False), base_url=BASE)


# -- digests --------------------------------------------------------------------------------------------------


class TestDigestRoute:
    async def test_a_digest_makes_the_node_healthy_with_its_processes(self) -> None:
        coordinator = RuntimeCoordinator()
        coordinator.register_node("n1", dead_url())
        async with app_client(create_coordinator_app(coordinator)) as client, coordinator.changes() as changes:
            answer = await client.post("/cluster/nodes/n1/heartbeat", json=DIGEST)
            assert answer.json() == {"status": "ok", "node_id": "n1"}
            entry = (await client.get("/cluster/status")).json()["nodes"]["n1"]
            published = await changes_so_far(changes)
        assert entry["status"] == "healthy" and entry["process_count"] == 2
        assert entry["processes"] == DIGEST["processes"]
        assert entry["health"] == {"status": "healthy", "node_id": "n1", "process_count": 2}
        assert isinstance(entry["last_heartbeat"], float)
        assert [(c.type, c.data) for c in published] == [
            ("node.health", {"node_id": "n1", "healthy": True, "missed_check": False, "process_count": 2, "error": ""}),
            ("node.processes", {"node_id": "n1", "processes": [{"name": "a", "state": "running"},
                                                               {"name": "b", "state": "stopped"}]}),
        ]  # fmt: skip
        await coordinator.aclose()

    async def test_an_empty_heartbeat_carries_no_digest(self) -> None:
        coordinator = RuntimeCoordinator()
        coordinator.register_node("n1", dead_url())
        async with app_client(create_coordinator_app(coordinator)) as client:
            assert (await client.post("/cluster/nodes/n1/heartbeat")).status_code == 200
            assert (await client.post("/cluster/nodes/n1/heartbeat", json={})).status_code == 200
        assert coordinator.get_node("n1").status == "unknown" and coordinator.get_node("n1").last_heartbeat is None

    @pytest.mark.parametrize(
        ("body", "code", "error"),
        [
            (b"nope", 400, "Invalid JSON body"),
            (b"[1]", 400, "Body must be a JSON object"),
            ({"process_count": -1}, 422, "process_count must be a non-negative integer"),
            ({"process_count": True}, 422, "process_count must be a non-negative integer"),
            ({"process_count": "2"}, 422, "process_count must be a non-negative integer"),
            ({"processes": "a"}, 422, "processes must be a list of {name, state, queue_size} objects"),
            ({"processes": [1]}, 422, "processes must be a list of {name, state, queue_size} objects"),
            ({"processes": [{"name": "", "state": "x"}]}, 422, "each process needs a non-empty text name"),
            ({"processes": [{"name": "a"}]}, 422, "each process needs a non-empty text name and a text state"),
            ({"processes": [{"name": "a", "state": "x", "queue_size": 1.5}]}, 422, "queue_size must be"),
            ({"uptime": 3}, 422, "a digest needs process_count or processes"),
        ],
    )
    async def test_a_malformed_digest_is_refused_and_changes_nothing(self, body: Any, code: int, error: str) -> None:
        coordinator = RuntimeCoordinator()
        coordinator.register_node("n1", dead_url())
        async with app_client(create_coordinator_app(coordinator)) as client:
            if isinstance(body, bytes):
                response = await client.post("/cluster/nodes/n1/heartbeat", content=body)
            else:
                response = await client.post("/cluster/nodes/n1/heartbeat", json=body)
        assert response.status_code == code
        assert response.json()["error"].startswith(error)
        assert coordinator.get_node("n1").status == "unknown"

    async def test_an_oversized_digest_is_413_and_an_unknown_node_404(self) -> None:
        coordinator = RuntimeCoordinator(max_digest_bytes=1024)
        coordinator.register_node("n1", dead_url())
        big = {"processes": [{"name": f"p{i}", "state": "running"} for i in range(100)]}
        async with app_client(create_coordinator_app(coordinator)) as client:
            response = await client.post("/cluster/nodes/n1/heartbeat", json=big)
            unknown = await client.post("/cluster/nodes/ghost/heartbeat", json=DIGEST)
        assert (response.status_code, response.json()) == (413, {"error": "Body larger than 1024 bytes"})
        assert (unknown.status_code, unknown.json()) == (404, {"error": "Node 'ghost' not registered"})
        assert coordinator.get_node("n1").status == "unknown"
        with pytest.raises(ValueError, match="max_digest_bytes"):
            RuntimeCoordinator(max_digest_bytes=0)

    def test_parse_digest(self) -> None:
        assert parse_digest({}) is None
        assert parse_digest({"process_count": 3}) == Digest(3, None)
        assert parse_digest({"processes": [{"name": "a", "state": "s", "x": 1}], "v": 2}) == Digest(
            1, [{"name": "a", "state": "s"}]
        )


class TestDigestsInsteadOfPolls:
    async def test_a_fresh_digest_is_not_polled_and_heartbeats_that_stop_turn_the_node_unhealthy(self) -> None:
        clock = ManualClock()
        coordinator = RuntimeCoordinator(health_check_interval=15, node_timeout=45, request_timeout=0.2, clock=clock)
        with counting_black_hole() as (silent, connections):
            coordinator.register_node("n1", silent)
            async with coordinator.changes() as changes:
                assert await coordinator.accept_heartbeat("n1", Digest(1, [{"name": "w", "state": "running"}]))
                # Fresh (younger than health_check_interval): healthy from the heartbeat, never polled.
                for _ in range(3):
                    clock.now += 4
                    status = await coordinator.cluster_status()
                    await coordinator.check_health(processes=True)
                assert connections() == 0
                assert status["nodes"]["n1"]["status"] == "healthy" and status["total_processes"] == 1
                # Heartbeats stop: once the digest is stale the node is polled, and the black hole costs one
                # request_timeout per check; inside node_timeout of the last heartbeat it stays healthy, flagged.
                clock.now += 4  # 16 s after the last heartbeat
                await coordinator.check_health()
                assert connections() == 1
                info = coordinator.get_node("n1")
                assert info.status == "healthy" and info.missed_checks == 1
                clock.now += 30  # 46 s after the last heartbeat: node_timeout passed
                await coordinator.check_health()
                assert info.status == "unhealthy" and connections() == 2
                assert (await coordinator.cluster_status())["healthy_nodes"] == 0
                # It heartbeats again: healthy at once, and polled no more.
                await coordinator.accept_heartbeat("n1", Digest(1))
                await coordinator.check_health()
                assert info.status == "healthy" and info.missed_checks == 0 and connections() == 3
                published = await changes_so_far(changes)
        verdicts = [(c.data["healthy"], c.data["missed_check"]) for c in published if c.type == "node.health"]
        assert verdicts == [(True, False), (True, True), (False, True), (True, False)]
        await coordinator.aclose()

    async def test_a_heartbeat_without_a_digest_leaves_the_node_to_its_polls(self) -> None:
        coordinator = RuntimeCoordinator(request_timeout=0.2)
        with counting_black_hole() as (silent, connections):
            coordinator.register_node("n1", silent)
            assert await coordinator.accept_heartbeat("n1")
            await coordinator.check_health()
            assert connections() == 1 and coordinator.get_node("n1").status == "unhealthy"
        await coordinator.aclose()

    async def test_digests_keep_the_totals_and_the_process_list_current(self) -> None:
        coordinator = RuntimeCoordinator()
        coordinator.register_node("a", dead_url())
        coordinator.register_node("b", dead_url())
        async with coordinator.changes() as changes:
            await coordinator.accept_heartbeat("a", Digest(2, [{"name": "x", "state": "running", "queue_size": 1}]))
            await coordinator.accept_heartbeat("b", Digest(3))
            # A queue size alone is not a change of processes; a state is.
            await coordinator.accept_heartbeat("a", Digest(2, [{"name": "x", "state": "running", "queue_size": 9}]))
            await coordinator.accept_heartbeat("a", Digest(2, [{"name": "x", "state": "stopped", "queue_size": 0}]))
            published = [c.data["processes"] for c in await changes_so_far(changes) if c.type == "node.processes"]
        assert published == [[{"name": "x", "state": "running"}], [{"name": "x", "state": "stopped"}]]
        assert coordinator.get_node("a").processes == [{"name": "x", "state": "stopped", "queue_size": 0}]
        status = coordinator.table_status()
        assert (status["total_nodes"], status["healthy_nodes"], status["total_processes"]) == (2, 2, 5)
        coordinator.unregister_node("b")
        status = coordinator.table_status()
        assert (status["total_nodes"], status["healthy_nodes"], status["total_processes"]) == (1, 1, 2)
        await coordinator.aclose()


@asynccontextmanager
async def served_coordinator(coordinator: RuntimeCoordinator) -> AsyncIterator[str]:
    server = AppServer(create_coordinator_app(coordinator), port=0)
    await server.start()
    try:
        yield server.url
    finally:
        await server.stop()


class TestSelfRegistrationDigests:
    async def test_a_node_sends_digests_and_follows_the_coordinators_heartbeat_interval(self) -> None:
        # A long ttl and a short health_check_interval: the node must heartbeat as the coordinator asks
        # (2/3 of 0.3 s), not every ttl/3, for its digest to stay fresh.
        coordinator = RuntimeCoordinator(discovery=RegistryDiscovery(ttl=60), health_check_interval=0.3)
        runtime = AgentRuntime()
        await runtime.add_process("worker", ProcessConfig())
        async with served_coordinator(coordinator) as url, CoordinatorDiscovery(url) as discovery:
            async with coordinator.changes() as changes:
                async with RuntimeTransport(runtime, port=0, node_id="n1", discovery=discovery) as node:
                    await wait_for(lambda: "n1" in coordinator.nodes and coordinator.nodes["n1"].processes is not None)
                    info = coordinator.get_node("n1")
                    assert node.app.state.node.registration.interval == pytest.approx(0.2)
                    assert info.status == "healthy" and info.last_heartbeat is not None
                    assert info.processes == [{"name": "worker", "state": "running", "queue_size": 0}]
                    await runtime.stop_process("worker")
                    await wait_for(lambda: info.processes == [{"name": "worker", "state": "stopped", "queue_size": 0}])
                    beats = info.last_heartbeat
                    await wait_for(lambda: info.last_heartbeat != beats, what="another heartbeat")
                published = await changes_so_far(changes)
        processes = [c.data["processes"] for c in published if c.type == "node.processes"]
        assert processes[:2] == [[{"name": "worker", "state": "running"}], [{"name": "worker", "state": "stopped"}]]
        await coordinator.aclose()

    async def test_a_coordinator_that_refuses_a_large_digest_gets_the_count(self) -> None:
        coordinator = RuntimeCoordinator(max_digest_bytes=200)
        runtime = AgentRuntime()
        for i in range(10):
            await runtime.add_process(f"process-with-a-long-name-{i}", ProcessConfig())
        async with served_coordinator(coordinator) as url, CoordinatorDiscovery(url) as discovery:
            async with RuntimeTransport(runtime, port=0, node_id="n1", discovery=discovery, heartbeat_interval=0.05):
                await wait_for(lambda: "n1" in coordinator.nodes and coordinator.nodes["n1"].last_heartbeat is not None)
                info = coordinator.get_node("n1")
                assert info.process_count == 10 and info.processes is None and info.status == "healthy"
        await coordinator.aclose()


# -- corners ----------------------------------------------------------------------------------------------------


class TestCorners:
    async def test_a_digest_for_a_node_only_the_registry_knows_is_ignored(self) -> None:
        registry = RegistryDiscovery(ttl=60)
        coordinator = RuntimeCoordinator(discovery=registry)
        await registry.register("elsewhere", dead_url())  # behind the coordinator's back
        assert await coordinator.accept_heartbeat("elsewhere", Digest(1)) is True
        assert "elsewhere" not in coordinator.nodes
        coordinator.note_processes("ghost", [{"name": "x", "state": "y"}])  # no such node: nothing to do
        await coordinator.aclose()

    async def test_a_process_list_that_cannot_be_read_leaves_the_verdict(self) -> None:
        async def health(request: Any) -> Any:
            from starlette.responses import JSONResponse

            return JSONResponse({"status": "healthy", "node_id": "n1", "process_count": 1})

        from starlette.applications import Starlette
        from starlette.routing import Route

        node_app = Starlette(routes=[Route("/health", health)])
        server = AppServer(node_app, port=0)
        await server.start()
        try:
            coordinator = RuntimeCoordinator()
            coordinator.register_node("n1", server.url)
            await coordinator.check_health(processes=True)  # /processes answers 404
            info = coordinator.get_node("n1")
            assert info.status == "healthy" and info.processes is None
            await coordinator.aclose()
        finally:
            await server.stop()

    async def test_a_digest_that_cannot_be_built_still_heartbeats(self, caplog: pytest.LogCaptureFixture) -> None:
        coordinator = RuntimeCoordinator()

        def broken() -> dict[str, Any]:
            raise RuntimeError("no status")

        async with served_coordinator(coordinator) as url, CoordinatorDiscovery(url) as discovery:
            registration = SelfRegistration(discovery, "n1", "http://127.0.0.1:9", interval=0.05, digest=broken)
            await registration.start()
            try:
                await wait_for(lambda: "could not build the heartbeat digest" in caplog.text)
                assert registration.registered and coordinator.get_node("n1").last_heartbeat is None
            finally:
                await registration.stop()
        await coordinator.aclose()
