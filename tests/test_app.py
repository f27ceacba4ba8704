"""`promptise_asgi:app`: the node built from the environment at lifespan startup (SPEC 6).

In-process through the ASGI lifespan protocol, and for real in subprocesses under uvicorn and hypercorn
(also with `-k trio`).
"""

from __future__ import annotations

import signal
import sys
from pathlib import Path

import httpx
import pytest
from support import free_port, lifespan, serve, wait_for_async, wait_healthy

import promptise_asgi
from promptise_asgi._module_app import NodeApp

ROOT = Path(__file__).parent.parent
EXAMPLE = ROOT / "examples" / "promptise.toml"


def test_app_is_a_real_module_attribute() -> None:
    assert "app" in vars(promptise_asgi)
    assert isinstance(promptise_asgi.app, NodeApp)


async def test_builds_from_config_file(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(ROOT))
    monkeypatch.setenv("PROMPTISE_CONFIG", str(EXAMPLE))
    monkeypatch.setenv("PROMPTISE_NODE_ID", "env-node")
    monkeypatch.setenv("PROMPTISE_AUTH_TOKEN", "tok")
    app = NodeApp()
    async with lifespan(app) as started:
        assert started["type"] == "lifespan.startup.complete", started
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as client:
            assert (await client.get("/health")).json() == {
                "status": "healthy",
                "node_id": "env-node",
                "process_count": 2,
            }
            assert (await client.get("/processes")).status_code == 401
            listed = await client.get("/processes", headers={"Authorization": "Bearer tok"})
            assert [p["state"] for p in listed.json()["processes"]] == ["running", "running"]
        assert app.settings is not None and app.settings.source == str(EXAMPLE)


async def test_demo_runtime_without_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("PROMPTISE_CONFIG", raising=False)
    app = NodeApp()
    async with lifespan(app) as started:
        assert started["type"] == "lifespan.startup.complete"
        assert app.settings is not None and app.settings.source == "demo"


async def test_bad_config_fails_startup_with_one_clear_message(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[[processes]]\nname = 'w'\nmax_queue = -1\n")
    monkeypatch.setenv("PROMPTISE_CONFIG", str(bad))
    async with lifespan(NodeApp()) as started:
        assert started["type"] == "lifespan.startup.failed"
        assert str(bad) in started["message"] and "('w')" in started["message"] and "max_queue" in started["message"]


async def test_registration_needs_an_advertise_url(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("PROMPTISE_CONFIG", raising=False)
    monkeypatch.delenv("PROMPTISE_ADVERTISE_URL", raising=False)
    monkeypatch.setenv("PROMPTISE_COORDINATOR_URL", "http://127.0.0.1:1")
    async with lifespan(NodeApp()) as started:
        assert started["type"] == "lifespan.startup.failed"
        assert "PROMPTISE_ADVERTISE_URL" in started["message"]


async def test_requests_without_lifespan_get_503() -> None:
    transport = httpx.ASGITransport(app=NodeApp())
    async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as client:
        response = await client.get("/health")
    assert response.status_code == 503
    assert "lifespan" in response.json()["error"]


# -- real servers, in subprocesses ------------------------------------------------------------------------------


SERVERS = {
    "uvicorn": lambda port: [sys.executable, "-m", "uvicorn", "promptise_asgi:app", "--port", str(port)],
    "hypercorn": lambda port: [sys.executable, "-m", "hypercorn", "promptise_asgi:app", "--bind", f"127.0.0.1:{port}"],
    "hypercorn-trio": lambda port: [
        sys.executable,
        "-m",
        "hypercorn",
        "-k",
        "trio",
        "promptise_asgi:app",
        "--bind",
        f"127.0.0.1:{port}",
    ],
}


@pytest.mark.slow
@pytest.mark.parametrize("server", list(SERVERS))
def test_served_by_a_server_cli(server: str) -> None:
    port = free_port()
    env = {"PROMPTISE_CONFIG": str(EXAMPLE), "PROMPTISE_NODE_ID": f"{server}-node"}
    with serve(SERVERS[server](port), env) as process:
        health = wait_healthy(f"http://127.0.0.1:{port}/health", process)
        assert health == {"status": "healthy", "node_id": f"{server}-node", "process_count": 2}
        response = httpx.post(f"http://127.0.0.1:{port}/processes/echo/event", json={"payload": {"via": server}})
        assert response.status_code == 202
        process.terminate()
        output, _ = process.communicate(timeout=15)
    # uvicorn re-raises the SIGTERM it handled once it has shut down, so -SIGTERM is a clean exit too.
    assert process.returncode in (0, -signal.SIGTERM), output
    assert "Traceback" not in output


@pytest.mark.slow
@pytest.mark.parametrize("server", ["uvicorn", "hypercorn"])
def test_server_exits_on_bad_config(server: str, tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text(
        "[[processes]]\nname = 'watcher'\n[[processes.triggers]]\ntype = 'cron'\ncron_expression = 'never'\n"
    )
    with serve(SERVERS[server](free_port()), {"PROMPTISE_CONFIG": str(bad)}) as process:
        output, _ = process.communicate(timeout=30)
    # The server exits rather than serving a broken node (hypercorn's own exit status is 0 even then).
    if server == "uvicorn":
        assert process.returncode != 0
    assert str(bad) in output and "'watcher'" in output and "cron_expression" in output


async def test_registers_with_the_coordinator_from_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from promptise_asgi.coordinator import RuntimeCoordinator, create_coordinator_app
    from promptise_asgi.discovery import RegistryDiscovery
    from promptise_asgi.transport import AppServer

    registry = RegistryDiscovery(ttl=30)
    coordinator = AppServer(create_coordinator_app(RuntimeCoordinator(discovery=registry)), port=0)
    await coordinator.start()
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("PROMPTISE_CONFIG", raising=False)
    monkeypatch.setenv("PROMPTISE_NODE_ID", "env-registered")
    monkeypatch.setenv("PROMPTISE_COORDINATOR_URL", coordinator.url)
    monkeypatch.setenv("PROMPTISE_ADVERTISE_URL", "http://127.0.0.1:9999")
    try:
        async with lifespan(NodeApp()) as started:
            assert started["type"] == "lifespan.startup.complete"

            async def registered() -> bool:
                return len(registry) == 1  # in the background: the node's start does not wait on the coordinator

            await wait_for_async(registered, what="the registration")
            nodes = await registry.discover()
            assert [(n.node_id, n.url) for n in nodes] == [("env-registered", "http://127.0.0.1:9999")]
        assert await registry.discover() == []  # unregistered at shutdown
    finally:
        await coordinator.stop()


class TestStore:
    """SPEC 12: the module app keeps its events in ./promptise-data/<node_id>.sqlite3 unless PROMPTISE_STORE says."""

    async def test_default_store_file_and_a_second_app_on_it_fails_naming_it(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
    ) -> None:
        monkeypatch.chdir(tmp_path)
        monkeypatch.delenv("PROMPTISE_STORE")
        monkeypatch.delenv("PROMPTISE_CONFIG", raising=False)
        caplog.set_level("INFO", logger="promptise_asgi")
        store = tmp_path / "promptise-data" / "node-1.sqlite3"
        async with lifespan(NodeApp()) as started:
            assert started["type"] == "lifespan.startup.complete", started
            assert store.is_file()
            assert f"node node-1 keeps accepted events in {store}" in caplog.messages
            # As `uvicorn --workers 2` would: a second app on the same file, while the first runs.
            async with lifespan(NodeApp()) as second:
                assert second["type"] == "lifespan.startup.failed"
                assert str(store) in second["message"] and "in use by another live runtime" in second["message"]

    async def test_memory_from_the_environment(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.chdir(tmp_path)
        monkeypatch.setenv("PROMPTISE_STORE", "memory")
        monkeypatch.delenv("PROMPTISE_CONFIG", raising=False)
        app = NodeApp()
        async with lifespan(app) as started:
            assert started["type"] == "lifespan.startup.complete"
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://127.0.0.1") as c:
                assert (await c.get("/processes/echo/status")).json()["store"] == "memory"
        assert not (tmp_path / "promptise-data").exists()
