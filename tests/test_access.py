"""Read-only tokens, the audit log and request ids (SPEC 15), over HTTP on the node and the coordinator."""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest

from promptise_asgi.coordinator import RuntimeCoordinator, create_coordinator_app
from promptise_asgi.runtime import AgentRuntime, ProcessConfig
from promptise_asgi.transport import AppServer, create_transport_app, node_lifespan

CONTROL, READ = "control-token", "read-token"
FORBIDDEN = {"error": "Forbidden: read-only token"}


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def fingerprint(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()[:8]


@asynccontextmanager
async def node_client(**options: Any) -> AsyncIterator[httpx.AsyncClient]:
    runtime = AgentRuntime()
    await runtime.add_process("worker", ProcessConfig())
    app = create_transport_app(runtime, auth_token=CONTROL, read_token=READ, **options)
    transport = httpx.ASGITransport(app=app, client=("10.1.2.3", 4321))
    async with node_lifespan(app), httpx.AsyncClient(transport=transport, base_url="http://node") as client:
        yield client


@asynccontextmanager
async def coordinator_client() -> AsyncIterator[tuple[RuntimeCoordinator, httpx.AsyncClient]]:
    coordinator = RuntimeCoordinator(auth_token="node-token")
    app = create_coordinator_app(coordinator, auth_token=CONTROL, read_token=READ)
    transport = httpx.ASGITransport(app=app, client=("10.1.2.3", 4321))
    async with coordinator, httpx.AsyncClient(transport=transport, base_url="http://coordinator") as client:
        yield coordinator, client


@pytest.fixture
def audit(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    caplog.set_level(logging.INFO, logger="promptise_asgi.audit")
    records: list[dict[str, Any]] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record.audit)  # type: ignore[attr-defined]

    handler = Collect()
    logging.getLogger("promptise_asgi.audit").addHandler(handler)
    yield records
    logging.getLogger("promptise_asgi.audit").removeHandler(handler)


class TestReadOnlyTokens:
    async def test_on_a_node_reads_and_streams_are_allowed_and_everything_else_is_403(self) -> None:
        async with node_client() as client:
            for path in ("/status", "/processes", "/processes/worker/status", "/metrics", "/openapi.json"):
                assert (await client.get(path, headers=bearer(READ))).status_code == 200, path
            for path in ("/processes/worker/stop", "/processes/worker/restart", "/processes/worker/event"):
                response = await client.post(path, headers=bearer(READ), json={})
                assert (response.status_code, response.json()) == (403, FORBIDDEN), path
            assert (await client.post("/processes/worker/stop", headers=bearer(CONTROL))).status_code == 200

    async def test_on_a_coordinator_the_same(self) -> None:
        async with coordinator_client() as (_, client):
            assert (await client.get("/cluster/status", headers=bearer(READ))).status_code == 200
            assert (await client.get("/cluster/nodes", headers=bearer(READ))).status_code == 200
            for method, path in (
                ("POST", "/cluster/processes/worker/event"),
                ("POST", "/cluster/nodes/n1/processes/worker/stop"),
                ("POST", "/cluster/nodes"),
                ("DELETE", "/cluster/nodes/n1"),
                ("POST", "/cluster/nodes/n1/heartbeat"),
            ):
                response = await client.request(method, path, headers=bearer(READ), json={})
                assert response.status_code == 403, path

    def test_a_read_token_needs_a_control_token(self) -> None:
        with pytest.raises(ValueError, match="read_token needs auth_token"):
            create_transport_app(AgentRuntime(), read_token=READ)
        with pytest.raises(ValueError, match="read_token must be"):
            create_transport_app(AgentRuntime(), auth_token=CONTROL, read_token=" ")


class TestAudit:
    async def test_every_state_changing_request_is_recorded_with_a_fingerprint_never_the_token(
        self, audit: list[dict[str, Any]], caplog: pytest.LogCaptureFixture
    ) -> None:
        async with node_client() as client:
            await client.get("/status", headers=bearer(CONTROL))  # reads are not audited
            await client.post("/processes/worker/stop", headers={**bearer(CONTROL), "X-Request-ID": "op-1"})
            await client.post("/processes/worker/start", headers=bearer(READ))  # refused: recorded too
            await client.post("/processes/worker/event", json={})  # no token: 401, recorded as open
            await client.post("/processes/worker/event", headers=bearer("guess"), json={})
        assert [(r["method"], r["path"], r["status"], r["scope"], r["token"]) for r in audit] == [
            ("POST", "/processes/worker/stop", 200, "control", fingerprint(CONTROL)),
            ("POST", "/processes/worker/start", 403, "read", fingerprint(READ)),
            ("POST", "/processes/worker/event", 401, "open", None),
            ("POST", "/processes/worker/event", 401, "open", fingerprint("guess")),
        ]
        assert audit[0]["request_id"] == "op-1" and audit[0]["client"] == "10.1.2.3:4321"
        assert all(r["time"].endswith("+00:00") for r in audit)
        text = caplog.text
        assert CONTROL not in text and READ not in text and "guess" not in text

    async def test_the_coordinator_records_registrations_and_control_but_not_heartbeats(
        self, audit: list[dict[str, Any]]
    ) -> None:
        async with coordinator_client() as (_, client):
            node = {"node_id": "n1", "url": "http://127.0.0.1:9"}
            assert (await client.post("/cluster/nodes", json=node, headers=bearer("node-token"))).status_code == 200
            await client.post("/cluster/nodes/n1/heartbeat", headers=bearer("node-token"))
            await client.post("/cluster/processes/worker/event", json={}, headers=bearer(CONTROL))
            await client.delete("/cluster/nodes/n1", headers=bearer("node-token"))
        assert [(r["method"], r["path"], r["scope"]) for r in audit] == [
            ("POST", "/cluster/nodes", "node"),
            ("POST", "/cluster/processes/worker/event", "control"),
            ("DELETE", "/cluster/nodes/n1", "node"),
        ]


class TestRequestIds:
    async def test_honoured_generated_and_echoed_on_every_answer(self) -> None:
        async with node_client() as client:
            echoed = await client.get("/health", headers={"X-Request-ID": "abc.DEF_1-2"})
            assert echoed.headers["x-request-id"] == "abc.DEF_1-2"
            for bad in (b"", b"x" * 129, b"has space", "ünï".encode()):
                response = await client.get("/health", headers={"X-Request-ID": bad})
                generated = response.headers["x-request-id"]
                assert generated.encode() != bad and re.fullmatch(r"[0-9a-f]{16}-[0-9a-f]+", generated)
            refused = await client.get("/status")  # a refusal carries it too
            assert refused.status_code == 401 and refused.headers["x-request-id"]
            missing = await client.get("/nowhere", headers=bearer(CONTROL))
            assert missing.status_code == 404 and "x-request-id" in missing.headers
            assert (await client.get("/health")).headers["x-request-id"] != refused.headers["x-request-id"]

    @pytest.mark.slow
    async def test_the_coordinator_forwards_the_id_to_the_nodes_it_calls(self) -> None:
        seen: list[str | None] = []
        runtime = AgentRuntime()
        await runtime.add_process("worker", ProcessConfig())
        node_app = create_transport_app(runtime, node_id="n1", auth_token="node-token", manage_runtime=True)
        server = AppServer(_RecordRequestIds(node_app, seen), "127.0.0.1", 0)
        await server.start()
        try:
            async with coordinator_client() as (coordinator, client):
                coordinator.register_node("n1", server.url)
                headers = {**bearer(CONTROL), "X-Request-ID": "trace-42"}
                assert (await client.post("/cluster/nodes/n1/processes/worker/stop", headers=headers)).is_success
                assert (await client.post("/cluster/processes/worker/event", json={}, headers=headers)).is_success
                assert (await client.get("/cluster/status", headers=headers)).is_success
        finally:
            await server.stop()
        assert seen.count("trace-42") >= 3  # the stop, the broadcast's event and the status round's check


class _RecordRequestIds:
    def __init__(self, app: Any, seen: list[str | None]) -> None:
        self.app, self.seen = app, seen

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            self.seen.append(dict(scope["headers"]).get(b"x-request-id", b"").decode() or None)
        await self.app(scope, receive, send)
