"""`promptise_asgi:app`: the node built from the environment at lifespan startup (SPEC 6).

In-process through the ASGI lifespan protocol, and for real in subprocesses under uvicorn and hypercorn
(also with `-k trio`).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

import promptise_asgi
from promptise_asgi._app import NodeApp

ROOT = Path(__file__).parent.parent
EXAMPLE = ROOT / "examples" / "promptise.toml"


@asynccontextmanager
async def lifespan(app: Any) -> AsyncIterator[dict[str, Any]]:
    """Drive an ASGI app's lifespan: yields the startup answer, then shuts it down."""
    to_app, app_inbox = anyio.create_memory_object_stream[dict[str, Any]](4)
    from_app, outbox = anyio.create_memory_object_stream[dict[str, Any]](4)
    async with to_app, app_inbox, from_app, outbox, anyio.create_task_group() as tg:
        tg.start_soon(
            app, {"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}, app_inbox.receive, from_app.send
        )
        await to_app.send({"type": "lifespan.startup"})
        started = await outbox.receive()
        yield started
        if started["type"] == "lifespan.startup.complete":
            await to_app.send({"type": "lifespan.shutdown"})
            assert (await outbox.receive())["type"] == "lifespan.shutdown.complete"


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
        assert started["type"] == "lifespan.startup.complete"
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


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def serve(command: list[str], env: dict[str, str]) -> Iterator[subprocess.Popen[str]]:
    process = subprocess.Popen(
        command, cwd=ROOT, env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        yield process
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:  # pragma: no cover - a hung server is the failure being reported
                process.kill()
                process.wait()


def wait_healthy(url: str, process: subprocess.Popen[str], timeout: float = 30.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(
                f"server exited early ({process.returncode}):\n{process.stdout.read() if process.stdout else ''}"
            )
        try:
            return httpx.get(url, timeout=1.0).json()  # type: ignore[no-any-return]
        except httpx.TransportError:
            time.sleep(0.1)
    raise AssertionError(f"no answer from {url} within {timeout}s")


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
            nodes = await registry.discover()
            assert [(n.node_id, n.url) for n in nodes] == [("env-registered", "http://127.0.0.1:9999")]
        assert await registry.discover() == []  # unregistered at shutdown
    finally:
        await coordinator.stop()
