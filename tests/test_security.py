"""Trust boundaries and limits (SPEC 18): each test reproduces an attack that worked on the first stage.

An attacker on the same network: remote peers that lie about `Host`, registrations that hijack a node id or
carry the operator's token where the node token belongs, URLs that broke every status call, oversized
metadata, answers and headers, and a discovery backend that is down or hung.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from support import dead_url, free_port, lifespan, non_loopback_address, serve, wait_healthy

from promptise_asgi._http import RequestGuard
from promptise_asgi._module_app import NodeApp
from promptise_asgi.client import NodeClient, NodeResponseTooLargeError
from promptise_asgi.coordinator import RuntimeCoordinator, create_coordinator_app
from promptise_asgi.discovery import DiscoveredNode, RegistryDiscovery
from promptise_asgi.runtime import AgentRuntime, ProcessConfig
from promptise_asgi.transport import AppServer, RuntimeTransport, create_transport_app, node_lifespan

REMOTE = ("203.0.113.9", 40000)  # TEST-NET-3: a peer on another machine
REFUSED = {"error": "Remote request refused: this node has no token"}


def client_for(app: Any, *, peer: tuple[str, int] = ("127.0.0.1", 50000), **headers: str) -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=app, client=peer)
    return httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1", headers=headers)


async def demo_runtime() -> AgentRuntime:
    runtime = AgentRuntime()
    await runtime.add_process("worker", ProcessConfig())
    return runtime


# -- a node with no token answers loopback peers only, whatever Host says ------------------------------------


class TestPeerGuard:
    async def test_a_remote_peer_lying_about_host_cannot_stop_a_process(self) -> None:
        runtime = await demo_runtime()
        app = create_transport_app(runtime)
        async with node_lifespan(app), client_for(app, peer=REMOTE, Host="127.0.0.1") as client:
            response = await client.post("/processes/worker/stop")
            assert (response.status_code, response.json()) == (403, REFUSED)
            for path in ("/status", "/processes", "/metrics", "/openapi.json", "/processes/worker/status"):
                assert (await client.get(path)).status_code == 403, path
            assert runtime.get_process("worker").state == "running"

    async def test_probes_stay_open_to_any_peer(self) -> None:
        app = create_transport_app(await demo_runtime())
        async with node_lifespan(app), client_for(app, peer=REMOTE, Host="10.1.2.3:9100") as client:
            for path in ("/health", "/livez", "/readyz"):
                assert (await client.get(path)).status_code == 200, path

    async def test_a_mounted_app_refuses_remote_peers_too(self) -> None:
        runtime = await demo_runtime()
        node = create_transport_app(runtime)
        host = Starlette(routes=[Mount("/runtime", node)])
        async with node_lifespan(node), client_for(host, peer=REMOTE) as client:
            response = await client.post("/runtime/processes/worker/stop")
            assert (response.status_code, response.json()) == (403, REFUSED)
            assert runtime.get_process("worker").state == "running"

    @pytest.mark.parametrize("peer", ["127.0.0.1", "127.8.9.10", "::1", "::ffff:127.0.0.1"])
    async def test_loopback_peers_are_served(self, peer: str) -> None:
        app = create_transport_app(await demo_runtime())
        async with node_lifespan(app), client_for(app, peer=(peer, 1)) as client:
            assert (await client.post("/processes/worker/stop")).status_code == 200

    async def test_opting_out_serves_remote_peers_and_a_token_serves_them_with_it(self) -> None:
        app = create_transport_app(await demo_runtime(), allow_unauthenticated=True)
        async with node_lifespan(app), client_for(app, peer=REMOTE, Host="node.example") as client:
            assert (await client.get("/status")).status_code == 200
        app = create_transport_app(await demo_runtime(), auth_token="t0ken")
        async with node_lifespan(app), client_for(app, peer=REMOTE, Host="node.example") as client:
            assert (await client.get("/status")).status_code == 401
            assert (await client.get("/status", headers={"Authorization": "Bearer t0ken"})).status_code == 200

    async def test_trusted_hosts_name_a_local_proxy_not_remote_peers(self) -> None:
        app = create_transport_app(await demo_runtime(), trusted_hosts=["node1.internal"])
        async with node_lifespan(app):
            async with client_for(app, Host="node1.internal") as client:
                assert (await client.get("/status")).status_code == 200
            async with client_for(app, peer=REMOTE, Host="node1.internal") as client:
                assert (await client.get("/status")).json() == REFUSED

    def test_the_verdict_cache_keeps_no_long_value_and_stays_bounded(self) -> None:
        guard = RequestGuard()
        for i in range(3000):
            host = f"{i}.example.com".encode() if i % 2 else b"h" * 1024 + str(i).encode()
            scope = {"type": "http", "method": "GET", "path": "/status", "headers": [(b"host", host)]}
            assert guard.refusal(scope) is not None
        for cache in (guard._host_allowed, guard._origin_allowed, guard._local_peer):
            assert len(cache) <= 1024 and cache.longest() <= 256


class TestModuleApp:
    """`uvicorn promptise_asgi:app --host 0.0.0.0` with no token used to obey anyone who set `Host: 127.0.0.1`."""

    async def test_no_token_refuses_remote_peers(self, monkeypatch: pytest.MonkeyPatch) -> None:
        for name in ("PROMPTISE_CONFIG", "PROMPTISE_AUTH_TOKEN", "PROMPTISE_ALLOW_UNAUTHENTICATED"):
            monkeypatch.delenv(name, raising=False)
        app = NodeApp()
        async with lifespan(app), client_for(app, peer=REMOTE, Host="127.0.0.1") as client:
            response = await client.post("/processes/echo/stop")
            assert (response.status_code, response.json()) == (403, REFUSED)
            assert (await client.get("/health")).status_code == 200

    async def test_allow_unauthenticated_opts_out_with_a_warning(
        self, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
    ) -> None:
        monkeypatch.delenv("PROMPTISE_AUTH_TOKEN", raising=False)
        monkeypatch.setenv("PROMPTISE_ALLOW_UNAUTHENTICATED", "1")
        caplog.set_level(logging.INFO, logger="promptise_asgi")
        app = NodeApp()
        async with lifespan(app), client_for(app, peer=REMOTE, Host="node.example") as client:
            assert (await client.get("/status")).status_code == 200
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "no token" in r.message]
        assert len(warnings) == 1 and "PROMPTISE_ALLOW_UNAUTHENTICATED" in warnings[0]

    async def test_trusted_hosts_from_the_environment(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.delenv("PROMPTISE_AUTH_TOKEN", raising=False)
        monkeypatch.setenv("PROMPTISE_TRUSTED_HOSTS", "node1.internal, proxy.lan")
        app = NodeApp()
        async with lifespan(app):
            async with client_for(app, Host="proxy.lan") as client:
                assert (await client.get("/status")).status_code == 200
            async with client_for(app, Host="other.lan") as client:
                assert (await client.get("/status")).status_code == 421

    async def test_a_bad_flag_value_fails_startup(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("PROMPTISE_ALLOW_UNAUTHENTICATED", "maybe")
        async with lifespan(NodeApp()) as started:
            assert started["type"] == "lifespan.startup.failed"
            assert "PROMPTISE_ALLOW_UNAUTHENTICATED" in started["message"]

    @pytest.mark.slow
    def test_uvicorn_on_all_interfaces_refuses_a_peer_on_another_address(self) -> None:
        address = non_loopback_address()
        if address is None:  # pragma: no cover - every CI machine has one
            pytest.skip("this machine has no non-loopback IPv4 address to connect from")
        port = free_port()
        command = [sys.executable, "-m", "uvicorn", "promptise_asgi:app", "--host", "0.0.0.0", "--port", str(port)]
        env = {"PROMPTISE_CONFIG": "examples/promptise.toml", "PROMPTISE_AUTH_TOKEN": ""}
        with serve(command, env) as process:
            wait_healthy(f"http://127.0.0.1:{port}/health", process)
            remote = f"http://{address}:{port}"
            response = httpx.post(f"{remote}/processes/echo/stop", headers={"Host": "127.0.0.1"})
            assert (response.status_code, response.json()) == (403, REFUSED)
            assert httpx.get(f"{remote}/health").status_code == 200
            assert httpx.get(f"http://127.0.0.1:{port}/processes/echo/status").json()["state"] == "running"


# -- registration is a node's act --------------------------------------------------------------------------


class Recorder:
    """A node-shaped app that remembers every request it is sent (but the server's own readiness probe)."""

    def __init__(self, node_id: str) -> None:
        self.node_id = node_id
        self.requests: list[tuple[str, str]] = []

        async def any_route(request: Request) -> Response:
            if request.url.path != "/livez":
                self.requests.append((request.url.path, request.headers.get("authorization", "")))
            return JSONResponse({"status": "healthy", "node_id": self.node_id, "process_count": 0})

        self.app = Starlette(routes=[Route("/{path:path}", any_route, methods=["GET", "POST"])])


@asynccontextmanager
async def served(app: Any) -> AsyncIterator[str]:
    server = AppServer(app, "127.0.0.1", 0)
    await server.start()
    try:
        yield server.url
    finally:
        await server.stop()


@asynccontextmanager
async def real_node(node_id: str, token: str) -> AsyncIterator[RuntimeTransport]:
    async with RuntimeTransport(await demo_runtime(), port=0, node_id=node_id, auth_token=token) as transport:
        yield transport


NODE_TOKEN, OPERATOR_TOKEN = "node-secret", "operator-secret"


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.mark.slow
class TestRegistration:
    async def test_a_live_node_cannot_be_displaced_and_the_node_token_goes_nowhere_else(self) -> None:
        coordinator = RuntimeCoordinator(auth_token=NODE_TOKEN)
        app = create_coordinator_app(coordinator, auth_token=OPERATOR_TOKEN)
        attacker = Recorder("node-1")
        async with coordinator, real_node("node-1", NODE_TOKEN) as node, served(attacker.app) as attacker_url:
            async with client_for(app, **bearer(NODE_TOKEN)) as client:
                assert (await client.post("/cluster/nodes", json={"node_id": "node-1", "url": node.url})).is_success
                hijack = await client.post("/cluster/nodes", json={"node_id": "node-1", "url": attacker_url})
                assert (hijack.status_code, hijack.json()) == (
                    409,
                    {"error": "Node 'node-1' is registered at another URL"},
                )
                assert (await client.post("/cluster/nodes/node-1/heartbeat")).status_code == 200
            assert coordinator.get_node("node-1").url == node.url
            await coordinator.cluster_status()
            await coordinator.stop_process_on_node("node-1", "worker")
            async with client_for(app, **bearer(OPERATOR_TOKEN)) as client:
                event = await client.post("/cluster/nodes/node-1/processes/worker/event", json={"payload": {"x": 1}})
                assert event.status_code == 202
        assert attacker.requests == []  # the attacker's server never heard from the coordinator

    async def test_the_operator_token_cannot_register_heartbeat_or_unregister(self) -> None:
        coordinator = RuntimeCoordinator(auth_token=NODE_TOKEN)
        app = create_coordinator_app(coordinator, auth_token=OPERATOR_TOKEN)
        forbidden = {"error": "Forbidden: registering nodes needs the node token"}
        async with client_for(app, **bearer(OPERATOR_TOKEN)) as client:
            register = await client.post("/cluster/nodes", json={"node_id": "evil", "url": "http://127.0.0.1:9"})
            assert (register.status_code, register.json()) == (403, forbidden)
            assert (await client.post("/cluster/nodes/evil/heartbeat")).status_code == 403
            assert (await client.delete("/cluster/nodes/evil")).status_code == 403
            assert (await client.get("/cluster/status")).status_code == 200
        async with client_for(app, **bearer(NODE_TOKEN)) as client:
            status = await client.get("/cluster/status")
            assert (status.status_code, status.json()) == (
                403,
                {"error": "Forbidden: the node token only registers nodes"},
            )
        async with client_for(app) as client:
            assert (await client.post("/cluster/nodes", json={"node_id": "x", "url": "http://h:1"})).status_code == 401
        assert "evil" not in coordinator.nodes

    async def test_one_shared_token_still_does_both(self) -> None:
        coordinator = RuntimeCoordinator(auth_token="shared")
        app = create_coordinator_app(coordinator, auth_token="shared")
        async with coordinator, real_node("n1", "shared") as node, client_for(app, **bearer("shared")) as client:
            assert (await client.post("/cluster/nodes", json={"node_id": "n1", "url": node.url})).status_code == 200
            assert (await client.get("/cluster/status")).json()["healthy_nodes"] == 1

    async def test_a_node_registered_in_process_with_its_own_token_is_never_replaced(self) -> None:
        coordinator = RuntimeCoordinator(auth_token=NODE_TOKEN)
        coordinator.register_node("api-node", dead_url(), auth_token="its-own")
        app = create_coordinator_app(coordinator)
        async with coordinator, client_for(app, **bearer(NODE_TOKEN)) as client:
            response = await client.post("/cluster/nodes", json={"node_id": "api-node", "url": "http://127.0.0.1:9"})
        assert response.status_code == 409
        assert coordinator.get_node("api-node").auth_token == "its-own"

    async def test_a_node_that_really_moved_may_register_its_new_url(self) -> None:
        coordinator = RuntimeCoordinator(discovery=RegistryDiscovery())
        app = create_coordinator_app(coordinator)
        mover = Recorder("node-1")
        other = Recorder("someone-else")
        async with (
            coordinator,
            served(mover.app) as new_url,
            served(other.app) as reused_url,
            client_for(app) as client,
        ):
            assert (await client.post("/cluster/nodes", json={"node_id": "node-1", "url": dead_url()})).is_success
            assert (await client.post("/cluster/nodes", json={"node_id": "node-1", "url": new_url})).is_success
            assert coordinator.get_node("node-1").url == new_url
            # The address answers as another node: node-1 no longer lives there, so it may move again.
            coordinator.register_node("node-2", reused_url)
            assert (await client.post("/cluster/nodes", json={"node_id": "node-2", "url": new_url})).is_success


# -- URLs the coordinator will call ---------------------------------------------------------------------------


class TestNodeURLs:
    @pytest.mark.parametrize(
        ("url", "problem"),
        [
            ("http://127.0.0.1:99999", "invalid port"),
            ("http://127.0.0.1:abc", "invalid port"),
            ("http://127.0.0.1:0", "invalid port"),
            ("http://user:pw@127.0.0.1:9100", "user info"),
            ("http://127.0.0.1:9100/?next=1", "query or a fragment"),
            ("http://127.0.0.1:9100#top", "query or a fragment"),
            ("http://169.254.169.254/latest/meta-data", "metadata"),
            ("http://[fe80::1]:9100", "link-local"),
            ("http://[::ffff:169.254.169.254]", "link-local"),
            ("gopher://127.0.0.1:70", "http(s) URL"),
            ("http://no-such-host.invalid:9100", "does not resolve"),
        ],
    )
    async def test_a_bad_url_is_422_naming_the_problem(self, url: str, problem: str) -> None:
        coordinator = RuntimeCoordinator()
        async with client_for(create_coordinator_app(coordinator)) as client:
            response = await client.post("/cluster/nodes", json={"node_id": "n1", "url": url})
        assert response.status_code == 422 and problem in response.json()["error"]
        assert not coordinator.nodes

    async def test_node_networks_limit_where_the_coordinator_connects(self) -> None:
        coordinator = RuntimeCoordinator(node_networks=["127.0.0.0/8"])
        async with client_for(create_coordinator_app(coordinator)) as client:
            inside = await client.post("/cluster/nodes", json={"node_id": "in", "url": "http://127.0.0.5:9100"})
            outside = await client.post("/cluster/nodes", json={"node_id": "out", "url": "http://10.0.0.5:9100"})
            # A name is resolved and every address checked.
            named = await client.post("/cluster/nodes", json={"node_id": "named", "url": "http://localhost:9100"})
        assert inside.status_code == 200 and named.status_code == 200
        assert (outside.status_code, outside.json()) == (
            422,
            {"error": "url host 10.0.0.5 is outside the allowed node networks (127.0.0.0/8)"},
        )
        with pytest.raises(ValueError, match="outside the allowed node networks"):
            coordinator.register_node("out", "http://192.168.1.1:9100")
        with pytest.raises(ValueError, match="not a CIDR"):
            RuntimeCoordinator(node_networks=["10.0.0.0/33"])

    async def test_a_bad_entry_in_the_backend_never_breaks_status_rounds_or_broadcast(
        self, caplog: pytest.LogCaptureFixture
    ) -> None:
        class HandWrittenRecords:
            """Records as someone wrote them straight into a shared backend (etcd, say), unchecked."""

            async def discover(self) -> list[DiscoveredNode]:
                return [
                    DiscoveredNode("bad-port", "http://127.0.0.1:99999"),
                    DiscoveredNode("metadata-server", "http://169.254.169.254"),
                    DiscoveredNode("fine", dead_url()),
                ]

            async def register(self, node_id: str, url: str, metadata: dict[str, Any] | None = None) -> None: ...

            async def unregister(self, node_id: str) -> None: ...

        coordinator = RuntimeCoordinator(discovery=HandWrittenRecords(), request_timeout=1)
        app = create_coordinator_app(coordinator)
        async with client_for(app) as client:
            status = await client.get("/cluster/status")
            assert status.status_code == 200 and list(status.json()["nodes"]) == ["fine"]
            assert (await client.get("/cluster/status")).status_code == 200
            broadcast = await client.post("/cluster/processes/worker/event", json={})
            assert broadcast.status_code == 200 and list(broadcast.json()["results"]) == ["fine"]
        skipped = [r.getMessage() for r in caplog.records if "not accepted" in r.getMessage()]
        assert len(skipped) == 2  # each refused record is logged once, not at every round


# -- sizes ----------------------------------------------------------------------------------------------------


class TestCoordinatorCaps:
    async def test_metadata_over_16_kib_is_413(self) -> None:
        coordinator = RuntimeCoordinator()
        async with client_for(create_coordinator_app(coordinator)) as client:
            body = {"node_id": "n1", "url": "http://127.0.0.1:9100", "metadata": {"blob": "x" * 17_000}}
            response = await client.post("/cluster/nodes", json=body)
            assert (response.status_code, response.json()) == (
                413,
                {"error": "metadata larger than 16384 bytes (serialized as JSON)"},
            )
            body["metadata"] = {"blob": "x" * 16_000}
            assert (await client.post("/cluster/nodes", json=body)).status_code == 200
        with pytest.raises(ValueError, match="metadata larger than"):
            coordinator.register_node("n2", "http://127.0.0.1:9101", {"blob": "x" * 17_000})

    async def test_max_nodes_refuses_new_nodes_with_503_but_refreshes_known_ones(self) -> None:
        coordinator = RuntimeCoordinator(discovery=RegistryDiscovery(), max_nodes=3)
        async with client_for(create_coordinator_app(coordinator)) as client:
            for i in range(3):
                url = f"http://127.0.0.1:{9100 + i}"
                assert (await client.post("/cluster/nodes", json={"node_id": f"n{i}", "url": url})).status_code == 200
            full = await client.post("/cluster/nodes", json={"node_id": "n3", "url": "http://127.0.0.1:9200"})
            again = await client.post("/cluster/nodes", json={"node_id": "n0", "url": "http://127.0.0.1:9100"})
        assert (full.status_code, full.json()) == (
            503,
            {"error": "cluster full: the coordinator holds its maximum of 3 nodes"},
        )
        assert again.status_code == 200 and len(coordinator.nodes) == 3

    async def test_a_registration_never_rereads_the_whole_backend(self) -> None:
        class Counting(RegistryDiscovery):
            discovers = 0

            async def discover(self) -> list[DiscoveredNode]:
                Counting.discovers += 1
                return await super().discover()

        coordinator = RuntimeCoordinator(discovery=Counting())
        async with client_for(create_coordinator_app(coordinator)) as client:
            for i in range(50):
                body = {"node_id": f"n{i}", "url": f"http://127.0.0.1:{9100 + i}", "metadata": {"i": i}}
                assert (await client.post("/cluster/nodes", json=body)).status_code == 200
            assert (await client.post("/cluster/nodes/n7/heartbeat")).status_code == 200
            assert (await client.delete("/cluster/nodes/n8")).status_code == 200
        assert Counting.discovers == 0
        assert len(coordinator.nodes) == 49 and coordinator.get_node("n3").metadata == {"i": 3}

    @pytest.mark.slow
    async def test_an_oversized_answer_from_a_node_is_502_and_is_not_read_whole(self) -> None:
        chunks_sent = 0

        async def flood(request: Request) -> Response:
            async def body() -> AsyncIterator[bytes]:
                nonlocal chunks_sent
                for _ in range(4096):  # 256 MiB if anyone read it all
                    chunks_sent += 1
                    yield b"x" * 65536
                    await anyio.sleep(0.001)  # lets the server notice that the reader went away

            return StreamingResponse(body(), media_type="application/json")

        node = Starlette(routes=[Route("/processes/{name}/start", flood, methods=["POST"])])
        coordinator = RuntimeCoordinator(max_response_bytes=1024 * 1024)
        async with coordinator, served(node) as url, client_for(create_coordinator_app(coordinator)) as client:
            coordinator.register_node("big", url)
            response = await client.post("/cluster/nodes/big/processes/worker/start")
        assert response.status_code == 502
        assert response.json()["error"].startswith("response too large")
        assert chunks_sent < 1000  # the coordinator hung up after about a megabyte, not 256

    async def test_the_client_cap_counts_a_declared_length_and_decoded_bytes(self) -> None:
        async def big(request: Request) -> Response:
            return JSONResponse({"blob": "x" * 5000})

        transport = httpx.ASGITransport(app=Starlette(routes=[Route("/status", big)]))
        async with NodeClient("http://node", transport=transport, max_response_bytes=4096) as client:
            with pytest.raises(NodeResponseTooLargeError, match="response too large"):
                await client.status()
        async with NodeClient("http://node", transport=transport, max_response_bytes=10_000) as client:
            assert len((await client.status())["blob"]) == 5000
        with pytest.raises(ValueError, match="max_response_bytes"):
            NodeClient("http://node", max_response_bytes=0)


# -- discovery outages are visible ------------------------------------------------------------------------------


class Flaky(RegistryDiscovery):
    """An in-process registry that can be made to fail (an etcd outage) or hang (a black-holed etcd)."""

    mode = "up"

    async def _maybe_fail(self) -> None:
        if self.mode == "down":
            raise OSError("connection refused by etcd at http://10.0.0.9:2379")
        if self.mode == "hung":
            await anyio.sleep_forever()

    async def register(self, node_id: str, url: str, metadata: Any = None) -> None:
        await self._maybe_fail()
        await super().register(node_id, url, metadata)

    async def discover(self) -> list[DiscoveredNode]:
        await self._maybe_fail()
        return await super().discover()

    async def heartbeat(self, node_id: str) -> bool:
        await self._maybe_fail()
        return await super().heartbeat(node_id)


class TestDiscoveryOutages:
    async def test_registration_while_the_backend_is_down_is_503_without_a_traceback(
        self, caplog: pytest.LogCaptureFixture
    ) -> None:
        discovery = Flaky()
        coordinator = RuntimeCoordinator(discovery=discovery)
        async with client_for(create_coordinator_app(coordinator)) as client:
            assert (await client.post("/cluster/nodes", json={"node_id": "a", "url": dead_url()})).is_success
            discovery.mode = "down"
            response = await client.post("/cluster/nodes", json={"node_id": "b", "url": dead_url()})
            heartbeat = await client.post("/cluster/nodes/a/heartbeat")
            status = (await client.get("/cluster/status")).json()
        assert (response.status_code, response.json()) == (
            503,
            {"error": "discovery unavailable: connection refused by etcd at http://10.0.0.9:2379"},
        )
        assert heartbeat.status_code == 503
        assert not any(record.exc_info for record in caplog.records)
        assert status["discovery"]["ok"] is False and "connection refused" in status["discovery"]["error"]
        assert isinstance(status["discovery"]["since"], float)
        assert list(status["nodes"]) == ["a"]  # the last known nodes, flagged as possibly stale
        discovery.mode = "up"
        async with client_for(create_coordinator_app(coordinator)) as client:
            status = (await client.get("/cluster/status")).json()
        assert status["discovery"] == {"ok": True, "error": None, "since": None}

    async def test_a_hung_backend_never_delays_status_beyond_the_discovery_timeout(self) -> None:
        discovery = Flaky()
        coordinator = RuntimeCoordinator(discovery=discovery, request_timeout=1)
        coordinator.register_node("a", dead_url())
        discovery.mode = "hung"
        async with client_for(create_coordinator_app(coordinator)) as client:
            started = anyio.current_time()
            status = await client.get("/cluster/status")
            elapsed = anyio.current_time() - started
            register = await client.post("/cluster/nodes", json={"node_id": "b", "url": dead_url()})
        assert status.status_code == 200 and elapsed < 2.0 + 1.0
        assert status.json()["discovery"]["error"] == "no answer within 2s"
        assert (register.status_code, register.json()) == (503, {"error": "discovery unavailable: no answer within 2s"})


# -- honest shutdown through a node -------------------------------------------------------------------------


async def test_a_node_that_exits_with_queued_events_says_how_many_are_discarded(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="promptise_asgi.runtime")
    runtime = await demo_runtime()
    app = create_transport_app(runtime)
    async with node_lifespan(app), client_for(app) as client:
        assert (await client.post("/processes/worker/stop")).status_code == 200
        for _ in range(5):
            assert (await client.post("/processes/worker/event", json={})).status_code == 202
    assert caplog.messages == [
        "Process 'worker': 5 queued event(s) discarded at exit: the memory store keeps no events across an exit"
    ]
