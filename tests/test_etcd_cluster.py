"""Coordinators and nodes sharing one real etcd registry (SPEC 7.5, issue: beyond one machine)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import anyio
import httpx
import pytest
from etcd_server import EtcdServer
from support import free_port, wait_for_async

from promptise_asgi.coordinator import RuntimeCoordinator, create_coordinator_app
from promptise_asgi.discovery import CoordinatorDiscovery
from promptise_asgi.etcd import EtcdDiscovery
from promptise_asgi.runtime import AgentRuntime, ProcessConfig
from promptise_asgi.transport import AppServer, RuntimeTransport

pytestmark = [pytest.mark.etcd, pytest.mark.slow]

ROOT = Path(__file__).parent.parent


async def wait_for_nodes(coordinator: RuntimeCoordinator, expected: list[str]) -> None:
    async def listed() -> bool:
        await coordinator.sync_discovery()
        return sorted(coordinator.nodes) == expected

    await wait_for_async(listed, what=f"nodes {expected}")


async def make_runtime() -> AgentRuntime:
    runtime = AgentRuntime()
    await runtime.add_process("worker", ProcessConfig())
    return runtime


async def test_two_coordinators_see_the_nodes_that_register_in_etcd(etcd: EtcdServer) -> None:
    prefix = f"/test/{uuid.uuid4().hex}/"
    async with (
        EtcdDiscovery(etcd.url, prefix=prefix, ttl=5) as for_a,
        EtcdDiscovery(etcd.url, prefix=prefix, ttl=5) as for_b,
        EtcdDiscovery(etcd.url, prefix=prefix, ttl=5) as for_nodes,
    ):
        coordinator_a = RuntimeCoordinator(discovery=for_a)
        coordinator_b = RuntimeCoordinator(discovery=for_b)
        async with (
            RuntimeTransport(await make_runtime(), port=0, node_id="n1", discovery=for_nodes, heartbeat_interval=0.5),
            RuntimeTransport(await make_runtime(), port=0, node_id="n2", discovery=for_nodes, heartbeat_interval=0.5),
        ):
            for coordinator in (coordinator_a, coordinator_b):
                await wait_for_nodes(coordinator, ["n1", "n2"])  # the nodes register in the background
                status = await coordinator.cluster_status()
                assert sorted(status["nodes"]) == ["n1", "n2"]
                assert status["healthy_nodes"] == 2 and status["total_processes"] == 2
            assert (await coordinator_b.restart_process_on_node("n1", "worker"))["status"] == "restarted"
        # The nodes unregistered as they stopped: both coordinators drop them.
        for coordinator in (coordinator_a, coordinator_b):
            await coordinator.sync_discovery()
            assert not coordinator.nodes
        await coordinator_a.aclose()
        await coordinator_b.aclose()


async def test_registration_through_one_coordinator_is_seen_by_another(etcd: EtcdServer) -> None:
    prefix = f"/test/{uuid.uuid4().hex}/"
    async with (
        EtcdDiscovery(etcd.url, prefix=prefix, ttl=5) as for_a,
        EtcdDiscovery(etcd.url, prefix=prefix, ttl=5) as for_b,
    ):
        coordinator_a = RuntimeCoordinator(discovery=for_a)
        coordinator_b = RuntimeCoordinator(discovery=for_b)
        server = AppServer(create_coordinator_app(coordinator_a), port=0)
        await server.start()
        try:
            async with (
                CoordinatorDiscovery(server.url) as via_a,
                RuntimeTransport(await make_runtime(), port=0, node_id="n1", discovery=via_a, heartbeat_interval=0.5),
            ):
                await wait_for_nodes(coordinator_b, ["n1"])
                # Coordinator A's heartbeat endpoint renews the etcd lease: the node outlives its 5 s TTL.
                await anyio.sleep(6)
                await coordinator_b.sync_discovery()
                assert list(coordinator_b.nodes) == ["n1"]
        finally:
            await server.stop()
        await coordinator_b.sync_discovery()
        assert not coordinator_b.nodes
        await coordinator_a.aclose()
        await coordinator_b.aclose()


def test_cli_coordinator_and_node_on_etcd(etcd: EtcdServer, tmp_path: Path) -> None:
    coordinator_port, node_port = free_port(), free_port()
    config = tmp_path / "node.toml"
    config.write_text(
        f'[node]\nid = "etcd-node"\nport = {node_port}\netcd = ["{etcd.url}"]\n'
        f'advertise_url = "http://127.0.0.1:{node_port}"\nheartbeat_interval = 1.0\n'
        '[[processes]]\nname = "worker"\n'
    )
    env = {**os.environ, "PROMPTISE_AUTH_TOKEN": ""}
    run = [sys.executable, "-m", "promptise_asgi", "--log-level", "warning"]
    coordinator = subprocess.Popen(
        [*run, "coordinator", "--port", str(coordinator_port), "--etcd", etcd.url],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    node = subprocess.Popen(
        [*run, "node", "--config", str(config)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 30
        table = ""
        while time.monotonic() < deadline and "etcd-node" not in table:
            time.sleep(0.3)
            result = subprocess.run(
                [*run, "status", "--coordinator", f"http://127.0.0.1:{coordinator_port}"],
                cwd=ROOT,
                env=env,
                capture_output=True,
                text=True,
            )
            table = result.stdout
        assert "etcd-node" in table and "healthy" in table, table
        listed = httpx.get(f"http://127.0.0.1:{coordinator_port}/cluster/nodes").json()
        assert listed["nodes"][0]["url"] == f"http://127.0.0.1:{node_port}"
    finally:
        for process in (node, coordinator):
            process.terminate()
            output, _ = process.communicate(timeout=30)
            assert "Traceback" not in output, output


async def test_with_etcd_down_registration_is_503_and_status_says_discovery_is_unavailable(
    own_etcd: EtcdServer, caplog: pytest.LogCaptureFixture
) -> None:
    prefix = f"/test/{uuid.uuid4().hex}/"
    async with EtcdDiscovery(own_etcd.url, prefix=prefix, ttl=5, timeout=1) as discovery:
        coordinator = RuntimeCoordinator(discovery=discovery, request_timeout=1)
        transport = httpx.ASGITransport(app=create_coordinator_app(coordinator))
        async with coordinator, httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as client:
            body = {"node_id": "n1", "url": "http://127.0.0.1:9"}
            assert (await client.post("/cluster/nodes", json=body)).status_code == 200
            own_etcd.stop()
            response = await client.post("/cluster/nodes", json={**body, "node_id": "n2"})
            assert response.status_code == 503
            assert response.json()["error"].startswith("discovery unavailable: etcd unavailable at")
            with anyio.fail_after(2 + 1):  # answered from the table, not after etcd's own timeouts
                status = (await client.get("/cluster/status")).json()
            assert status["discovery"]["ok"] is False and list(status["nodes"]) == ["n1"]
            own_etcd.start()
            await wait_for_registration(client, body)
    assert not any(record.exc_info for record in caplog.records)  # no traceback in the log


async def wait_for_registration(client: httpx.AsyncClient, body: dict[str, str]) -> None:
    with anyio.fail_after(20):
        while (await client.post("/cluster/nodes", json=body)).status_code != 200:
            await anyio.sleep(0.2)
    status = (await client.get("/cluster/status")).json()
    assert status["discovery"] == {"ok": True, "error": None, "since": None}
