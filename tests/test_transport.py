"""The node HTTP API (SPEC 3, 4) at the wire level, in-process through httpx.ASGITransport."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import httpx
import pytest
from starlette.applications import Starlette
from starlette.routing import Mount
from support import wait_for

from promptise_asgi.runtime import AgentRuntime, ProcessConfig, TriggerEvent
from promptise_asgi.transport import create_transport_app, node_lifespan
from promptise_asgi.transport._endpoints import api_routes

BASE = "http://127.0.0.1"


def client_for(app: Any, base_url: str = BASE, **kwargs: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app, raise_app_exceptions=False), base_url=base_url, **kwargs
    )


class Recorder:
    def __init__(self) -> None:
        self.events: list[TriggerEvent] = []

    async def __call__(self, event: TriggerEvent) -> None:
        self.events.append(event)


@asynccontextmanager
async def running_node(
    *, token: str | list[str] | None = None, **options: Any
) -> AsyncIterator[tuple[AgentRuntime, httpx.AsyncClient, Recorder]]:
    recorder = Recorder()
    runtime = AgentRuntime()
    await runtime.add_process("worker", ProcessConfig(handler=recorder, max_queue=options.pop("max_queue", 1000)))
    await runtime.add_process("idle", ProcessConfig())
    app = create_transport_app(runtime, node_id="node-1", auth_token=token, **options)
    async with node_lifespan(app), client_for(app) as client:
        yield runtime, client, recorder


async def test_health_reports_node_and_process_count() -> None:
    async with running_node() as (_, client, _):
        response = await client.get("/health")
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    assert response.json() == {"status": "healthy", "node_id": "node-1", "process_count": 2}


async def test_head_health_has_no_body() -> None:
    async with running_node() as (_, client, _):
        response = await client.head("/health")
    assert response.status_code == 200
    assert response.content == b""


async def test_status_is_runtime_status_plus_node_id() -> None:
    async with running_node() as (_runtime, client, _):
        body = (await client.get("/status")).json()
        assert body["node_id"] == "node-1"
        assert body["process_count"] == 2
        assert set(body["processes"]) == {"worker", "idle"}
        assert body["processes"]["worker"]["state"] == "running"


async def test_list_processes_in_insertion_order() -> None:
    async with running_node() as (runtime, client, _):
        body = (await client.get("/processes")).json()
    assert body["node_id"] == "node-1"
    assert [p["name"] for p in body["processes"]] == ["worker", "idle"]
    assert body["processes"][0] == {
        "name": "worker",
        "state": "running",
        "process_id": runtime.get_process("worker").process_id,
    }


async def test_process_status_and_unknown_process() -> None:
    async with running_node() as (_, client, _):
        ok = await client.get("/processes/worker/status")
        missing = await client.get("/processes/nope/status")
    assert ok.status_code == 200
    assert ok.json()["name"] == "worker"
    assert missing.status_code == 404
    assert missing.json() == {"error": "Process 'nope' not found"}


async def test_start_stop_restart_report_changes() -> None:
    async with running_node() as (runtime, client, _):
        stop = await client.post("/processes/worker/stop")
        assert stop.json() == {"status": "stopped", "name": "worker", "changed": True}
        assert runtime.get_process("worker").state == "stopped"
        again = await client.post("/processes/worker/stop")
        assert again.json() == {"status": "stopped", "name": "worker", "changed": False}
        start = await client.post("/processes/worker/start")
        assert start.json() == {"status": "started", "name": "worker", "changed": True}
        running = await client.post("/processes/worker/start")
        assert running.status_code == 200
        assert running.json() == {"status": "started", "name": "worker", "changed": False}
        restart = await client.post("/processes/worker/restart")
        assert restart.json() == {"status": "restarted", "name": "worker"}
        assert runtime.get_process("worker").status()["restart_count"] == 1


@pytest.mark.parametrize("action", ["start", "stop", "restart", "event"])
async def test_actions_on_unknown_process_are_404(action: str) -> None:
    async with running_node() as (_, client, _):
        response = await client.post(f"/processes/nope/{action}", content=b"{not json")
    assert response.status_code == 404
    assert response.json() == {"error": "Process 'nope' not found"}


async def test_failed_start_is_json_500_naming_the_cause() -> None:
    runtime = AgentRuntime()
    await runtime.add_process("broken", ProcessConfig(handler="no_such_module_xyz:handler"))
    app = create_transport_app(runtime)
    async with client_for(app) as client:
        response = await client.post("/processes/broken/start")
    assert response.status_code == 500
    assert "no_such_module_xyz:handler" in response.json()["error"]
    assert runtime.get_process("broken").state == "failed"


async def test_event_reaches_the_handler_with_defaults() -> None:
    async with running_node() as (_, client, recorder):
        response = await client.post("/processes/worker/event", json={"payload": {"a": 1}})
        assert response.status_code == 202
        body = response.json()
        assert body["status"] == "injected" and body["process"] == "worker"
        await wait_for(lambda: len(recorder.events) == 1)
    event = recorder.events[0]
    assert event.event_id == body["event_id"]
    assert (event.trigger_id, event.trigger_type, event.payload, event.metadata) == ("remote", "remote", {"a": 1}, {})


async def test_event_fields_are_passed_through() -> None:
    body = {"trigger_id": "t-1", "trigger_type": "webhook", "payload": {"b": 2}, "metadata": {"m": "x"}, "extra": 5}
    async with running_node() as (_, client, recorder):
        assert (await client.post("/processes/worker/event", json=body)).status_code == 202
        await wait_for(lambda: len(recorder.events) == 1)
    event = recorder.events[0]
    assert (event.trigger_id, event.trigger_type, event.payload, event.metadata) == (
        "t-1",
        "webhook",
        {"b": 2},
        {"m": "x"},
    )


async def test_event_scalar_trigger_fields_become_text_and_blank_ones_default() -> None:
    async with running_node() as (_, client, recorder):
        await client.post("/processes/worker/event", json={"trigger_id": 123, "trigger_type": "", "payload": None})
        await wait_for(lambda: len(recorder.events) == 1)
    assert (recorder.events[0].trigger_id, recorder.events[0].trigger_type) == ("123", "remote")
    assert recorder.events[0].payload == {}


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"{not json", "Invalid JSON body"),
        (b"", "Invalid JSON body"),
        (b"\xff\xfe", "Invalid JSON body"),
        (b"[1, 2]", "Body must be a JSON object"),
        (b'"str"', "Body must be a JSON object"),
        (b'{"payload": "hello"}', "payload must be a JSON object"),
        (b'{"payload": [1]}', "payload must be a JSON object"),
        (b'{"metadata": [1]}', "metadata must be a JSON object"),
        (b'{"payload": [1], "metadata": 3}', "payload must be a JSON object"),
        (b'{"trigger_id": {"a": 1}}', "trigger_id must be a string"),
    ],
)
async def test_bad_event_bodies_are_400_and_nothing_is_queued(content: bytes, message: str) -> None:
    async with running_node() as (runtime, client, _recorder):
        response = await client.post("/processes/worker/event", content=content)
        assert response.status_code == 400
        assert response.json() == {"error": message}
        assert runtime.get_process("worker").status()["events_received"] == 0


async def test_oversized_body_is_413_by_declared_length() -> None:
    async with running_node(max_body_bytes=64) as (runtime, client, _):
        response = await client.post("/processes/worker/event", json={"payload": {"x": "y" * 100}})
        assert response.status_code == 413
        assert "error" in response.json()
        assert runtime.get_process("worker").status()["events_received"] == 0


async def test_full_queue_is_429_with_retry_after_and_accepted_events_all_handled() -> None:
    async with running_node(max_queue=3) as (_runtime, client, recorder):
        await client.post("/processes/worker/stop")
        codes = [
            (await client.post("/processes/worker/event", json={"payload": {"i": i}})).status_code for i in range(5)
        ]
        assert codes == [202, 202, 202, 429, 429]
        refused = await client.post("/processes/worker/event", json={})
        assert refused.headers["retry-after"] == "1"
        assert "full" in refused.json()["error"]
        await client.post("/processes/worker/start")
        await wait_for(lambda: len(recorder.events) == 3)
    assert [e.payload["i"] for e in recorder.events] == [0, 1, 2]


async def test_percent_encoded_names_with_spaces_and_non_ascii() -> None:
    runtime = AgentRuntime()
    await runtime.add_process("a b", ProcessConfig())
    await runtime.add_process("café", ProcessConfig())
    app = create_transport_app(runtime)
    async with client_for(app) as client:
        spaced = await client.get("/processes/a%20b/status")
        accented = await client.post("/processes/caf%C3%A9/event", json={})
        missing = await client.get("/processes/x%20y/status")
    assert spaced.json()["name"] == "a b"
    assert accented.status_code == 202 and accented.json()["process"] == "café"
    assert missing.json() == {"error": "Process 'x y' not found"}


async def test_unknown_route_and_trailing_slash_are_json_404() -> None:
    async with running_node() as (_, client, _):
        for path in ("/unknown", "/health/", "/cluster/nodes"):
            response = await client.get(path)
            assert response.status_code == 404, path
            assert response.json() == {"error": "Not Found"}


@pytest.mark.parametrize(
    ("method", "path", "allow"),
    [("GET", "/processes/worker/start", "POST"), ("POST", "/health", "GET, HEAD"), ("DELETE", "/status", "GET, HEAD")],
)
async def test_wrong_method_is_405_with_allow(method: str, path: str, allow: str) -> None:
    async with running_node() as (_, client, _):
        response = await client.request(method, path)
    assert response.status_code == 405
    assert set(response.headers["allow"].split(", ")) == set(allow.split(", "))
    assert response.json() == {"error": "Method Not Allowed"}


async def test_unexpected_failure_is_json_500_without_traceback(monkeypatch: pytest.MonkeyPatch) -> None:
    async with running_node() as (runtime, client, _):

        def explode() -> dict[str, Any]:
            raise RuntimeError("secret internals")

        monkeypatch.setattr(runtime, "status", explode)
        response = await client.get("/status")
    assert response.status_code == 500
    assert response.json() == {"error": "Internal server error"}
    assert "secret" not in response.text and "Traceback" not in response.text


async def test_failing_inject_is_json_500(monkeypatch: pytest.MonkeyPatch) -> None:
    async with running_node() as (runtime, client, _):

        async def explode(event: Any) -> None:
            raise RuntimeError("boom")

        monkeypatch.setattr(runtime.get_process("worker"), "inject", explode)
        response = await client.post("/processes/worker/event", json={})
    assert response.status_code == 500
    assert response.json() == {"error": "Internal server error"}


class TestProbes:
    async def test_readiness_follows_the_node_lifespan(self) -> None:
        runtime = AgentRuntime()
        await runtime.add_process("w", ProcessConfig())
        app = create_transport_app(runtime, node_id="n")
        async with client_for(app) as client:
            before = await client.get("/readyz")
            assert before.status_code == 503
            assert before.json()["status"] == "starting" and "error" in before.json()
            async with node_lifespan(app):
                assert (await client.get("/readyz")).json() == {"status": "ready", "node_id": "n"}
                assert runtime.get_process("w").state == "running"
            after = await client.get("/readyz")
            assert after.status_code == 503 and after.json()["status"] == "stopped"
            assert runtime.get_process("w").state == "stopped"
            # Liveness never depends on the runtime.
            assert (await client.get("/livez")).json() == {"status": "alive"}

    async def test_readiness_is_503_while_draining(self) -> None:
        release = anyio.Event()
        started = anyio.Event()
        readiness: list[int] = []

        async def slow(event: TriggerEvent) -> None:
            started.set()
            await release.wait()

        runtime = AgentRuntime()
        await runtime.add_process("w", ProcessConfig(handler=slow, drain_timeout=30))
        app = create_transport_app(runtime)
        async with client_for(app) as client, anyio.create_task_group() as tg:

            async def run_node() -> None:
                async with node_lifespan(app):
                    await client.post("/processes/w/event", json={})
                    await started.wait()

            tg.start_soon(run_node)
            await started.wait()
            await wait_for(lambda: app.state.node.phase == "draining")
            readiness.append((await client.get("/readyz")).status_code)
            release.set()
        assert readiness == [503]


class TestSecurity:
    async def test_token_required_except_probes(self) -> None:
        async with running_node(token="s3cret") as (_, client, _):
            for path in ("/health", "/livez", "/readyz"):
                assert (await client.get(path)).status_code == 200, path
            for method, path in [
                ("GET", "/status"),
                ("GET", "/processes"),
                ("GET", "/metrics"),
                ("GET", "/openapi.json"),
                ("POST", "/processes/nope/start"),
                ("GET", "/nope"),
            ]:
                response = await client.request(method, path)
                assert response.status_code == 401, path
                assert response.json() == {"error": "Unauthorized"}
                assert response.headers["www-authenticate"] == "Bearer"

    @pytest.mark.parametrize(
        ("header", "code"),
        [
            ("Bearer s3cret", 200),
            ("bearer s3cret", 200),
            ("BEARER s3cret", 200),
            ("Bearer wrong", 401),
            ("Token s3cret", 401),
            ("s3cret", 401),
            ("Bearer ", 401),
            ("Bearer s3cret2", 401),
        ],
    )
    async def test_authorization_header_forms(self, header: str, code: int) -> None:
        async with running_node(token="s3cret") as (_, client, _):
            response = await client.get("/status", headers={"Authorization": header})
        assert response.status_code == code

    async def test_several_tokens_for_rotation(self) -> None:
        async with running_node(token=["old", "new"]) as (_, client, _):
            for token, code in (("old", 200), ("new", 200), ("other", 401)):
                response = await client.get("/processes", headers={"Authorization": f"Bearer {token}"})
                assert response.status_code == code

    @pytest.mark.parametrize("token", ["", "   ", [], ["ok", " "]])
    def test_blank_tokens_are_refused(self, token: Any) -> None:
        with pytest.raises(ValueError, match="auth_token"):
            create_transport_app(AgentRuntime(), auth_token=token)

    @pytest.mark.parametrize(
        ("headers", "code", "error"),
        [
            ({"Host": "evil.example.com"}, 421, "Misdirected request"),
            ({"Host": "evil.example.com:80"}, 421, "Misdirected request"),
            ({"Host": "10.0.0.1"}, 421, "Misdirected request"),
            ({"Host": "localhost:1234"}, 200, None),
            ({"Host": "127.0.0.2"}, 200, None),
            ({"Host": "[::1]:9100"}, 200, None),
            ({"Origin": "http://evil.example.com"}, 403, "Cross-origin request refused"),
            ({"Origin": "null"}, 403, "Cross-origin request refused"),
            ({"Origin": "file://"}, 403, "Cross-origin request refused"),
            ({"Origin": "http://localhost:3000"}, 200, None),
            ({"Origin": "http://[::1]:3000"}, 200, None),
        ],
    )
    async def test_loopback_guard_without_token(self, headers: dict[str, str], code: int, error: str | None) -> None:
        async with running_node() as (_, client, _):
            response = await client.get("/status", headers=headers)
        assert response.status_code == code
        if error:
            assert response.json() == {"error": error}

    async def test_guard_applies_to_mutations(self) -> None:
        async with running_node() as (runtime, client, _):
            response = await client.post("/processes/worker/stop", headers={"Origin": "https://evil.example.com"})
            assert response.status_code == 403
            assert runtime.get_process("worker").state == "running"

    async def test_trusted_hosts_and_explicit_opt_out(self) -> None:
        async with running_node(trusted_hosts=["node1.internal"]) as (_, client, _):
            assert (await client.get("/status", headers={"Host": "node1.internal:9100"})).status_code == 200
            assert (await client.get("/status", headers={"Host": "other.internal"})).status_code == 421
        async with running_node(allow_unauthenticated=True) as (_, client, _):
            assert (await client.get("/status", headers={"Host": "anything.example"})).status_code == 200

    async def test_token_replaces_the_host_guard(self) -> None:
        async with running_node(token="t") as (_, client, _):
            response = await client.get("/processes", headers={"Host": "node1.example", "Authorization": "Bearer t"})
        assert response.status_code == 200


class TestMetricsAndOpenAPI:
    async def test_metrics_are_prometheus_text_from_a_per_app_registry(self) -> None:
        async with running_node() as (_, client, recorder):
            await client.post("/processes/worker/event", json={})
            await wait_for(lambda: len(recorder.events) == 1)
            response = await client.get("/metrics")
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/plain")
        text = response.text
        assert 'promptise_node_info{node_id="node-1"} 1.0' in text
        assert 'promptise_process_events_handled_total{process="worker"} 1.0' in text
        assert 'promptise_process_state{process="worker",state="running"} 1.0' in text

    async def test_two_apps_do_not_share_metrics(self) -> None:
        first, second = AgentRuntime(), AgentRuntime()
        await first.add_process("only-first", ProcessConfig())
        async with client_for(create_transport_app(second, node_id="b")) as client:
            text = (await client.get("/metrics")).text
        assert "only-first" not in text and 'node_id="b"' in text

    async def test_metrics_path_does_not_redirect(self) -> None:
        async with running_node() as (_, client, _):
            response = await client.get("/metrics", follow_redirects=False)
        assert response.status_code == 200

    async def test_openapi_lists_every_route(self) -> None:
        async with running_node() as (_, client, _):
            document = (await client.get("/openapi.json")).json()
        assert document["openapi"].startswith("3.1")
        assert document["servers"] == [{"url": "/"}]
        # Every route of the app's one table is documented (the document itself aside), and nothing else.
        routes = {route.path for route in api_routes()} - {"/openapi.json"}
        assert set(document["paths"]) == routes
        assert {
            "/changes",
            "/processes/{name}/event",
            "/processes/{name}/dead-letters",
            "/processes/{name}/dead-letters/{event_id}/retry",
            "/processes/{name}/dead-letters/{event_id}",
            "/metrics",
        } <= routes
        assert "security" not in document

    async def test_openapi_declares_bearer_when_secured(self) -> None:
        async with running_node(token="t") as (_, client, _):
            document = (await client.get("/openapi.json", headers={"Authorization": "Bearer t"})).json()
        assert document["security"] == [{"bearer": []}]
        assert document["paths"]["/health"]["get"]["security"] == []


class TestMounting:
    @pytest.mark.parametrize("prefix", ["/runtime", "/api/v1/node"])
    async def test_mounted_in_starlette(self, prefix: str) -> None:
        runtime = AgentRuntime()
        recorder = Recorder()
        await runtime.add_process("worker", ProcessConfig(handler=recorder))
        node = create_transport_app(runtime, node_id="mounted")

        @asynccontextmanager
        async def lifespan(app: Starlette) -> AsyncIterator[None]:
            async with node_lifespan(node):
                yield

        host = Starlette(routes=[Mount(prefix, app=node)], lifespan=lifespan)
        async with node_lifespan(node), client_for(host) as client:
            health = await client.get(f"{prefix}/health")
            assert health.json()["node_id"] == "mounted"
            injected = await client.post(f"{prefix}/processes/worker/event", json={"payload": {"k": 1}})
            assert injected.status_code == 202
            await wait_for(lambda: len(recorder.events) == 1)
            document = (await client.get(f"{prefix}/openapi.json")).json()
            assert document["servers"] == [{"url": prefix}]
            assert (await client.get(f"{prefix}/nope")).json() == {"error": "Not Found"}
            assert (await client.get(f"{prefix}/metrics")).status_code == 200

    async def test_mounted_in_fastapi_with_its_lifespan(self) -> None:
        fastapi = pytest.importorskip("fastapi")
        runtime = AgentRuntime()
        await runtime.add_process("worker", ProcessConfig())
        node = create_transport_app(runtime, node_id="inside-fastapi", auth_token="t")

        @asynccontextmanager
        async def lifespan(app: Any) -> AsyncIterator[None]:
            async with node_lifespan(node):
                yield

        api = fastapi.FastAPI(lifespan=lifespan)

        @api.get("/hello")
        async def hello() -> dict[str, str]:
            return {"hello": "world"}

        api.mount("/runtime", node)
        async with lifespan(api), client_for(api, headers={"Authorization": "Bearer t"}) as client:
            assert (await client.get("/hello")).json() == {"hello": "world"}
            listed = (await client.get("/runtime/processes")).json()
            assert listed["processes"][0]["state"] == "running"
            assert (await client.get("/runtime/status", headers={"Authorization": "Bearer no"})).status_code == 401
        assert runtime.get_process("worker").state == "stopped"


async def test_concurrent_injections_are_all_handled() -> None:
    handled: list[int] = []

    async def handler(event: TriggerEvent) -> None:
        handled.append(event.payload["i"])

    runtime = AgentRuntime()
    await runtime.add_process("worker", ProcessConfig(handler=handler, concurrency=4, max_queue=5000))
    app = create_transport_app(runtime)
    accepted: list[int] = []
    async with node_lifespan(app), client_for(app) as client:

        async def inject(i: int) -> None:
            response = await client.post("/processes/worker/event", json={"payload": {"i": i}})
            if response.status_code == 202:
                accepted.append(i)

        async with anyio.create_task_group() as tg:
            for i in range(2000):
                tg.start_soon(inject, i)
        await wait_for(lambda: len(handled) == len(accepted), timeout=30)
    assert len(accepted) == 2000
    assert sorted(handled) == list(range(2000))


async def test_middleware_added_by_the_user_sees_api_requests_too() -> None:
    seen: list[str] = []

    class Spy:
        def __init__(self, app: Any) -> None:
            self.app = app

        async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
            if scope["type"] == "http":
                seen.append(scope["path"])
            await self.app(scope, receive, send)

    runtime = AgentRuntime()
    await runtime.add_process("worker", ProcessConfig())
    app = create_transport_app(runtime)
    app.add_middleware(Spy)
    app.add_exception_handler(KeyError, lambda request, exc: None)  # type: ignore[arg-type,return-value]
    async with client_for(app) as client:
        assert (await client.get("/health")).status_code == 200
        assert (await client.post("/processes/worker/event", json={})).status_code == 202
    assert seen == ["/health", "/processes/worker/event"]


async def test_names_with_slashes_never_reach_a_process() -> None:
    async with running_node() as (_, client, _):
        response = await client.post("/processes/a/b/event", json={})
    assert response.status_code == 404


async def test_a_failed_start_stops_the_processes_that_did_start() -> None:
    runtime = AgentRuntime()
    await runtime.add_process("good", ProcessConfig())
    await runtime.add_process("bad", ProcessConfig(handler="nosuchmodule_xyz:fn"))
    app = create_transport_app(runtime)
    with pytest.raises(ValueError, match="nosuchmodule_xyz"):
        async with node_lifespan(app):
            pass  # pragma: no cover - never entered
    assert runtime.get_process("good").state == "stopped"
    assert app.state.node.phase == "stopped"


async def test_a_token_read_with_its_trailing_newline_still_works() -> None:
    async with running_node(token="s3cret\n") as (_, client, _):
        response = await client.get("/status", headers={"Authorization": "Bearer s3cret"})
    assert response.status_code == 200


@pytest.mark.parametrize("token", ["two words", "tok\r\nX-Injected: 1", "caf\u00e9"])
def test_tokens_that_cannot_travel_in_a_header_are_refused(token: str) -> None:
    from promptise_asgi.coordinator import RuntimeCoordinator

    with pytest.raises(ValueError, match="printable ASCII"):
        create_transport_app(AgentRuntime(), auth_token=token)
    with pytest.raises(ValueError, match="printable ASCII"):
        RuntimeCoordinator(auth_token=token)
    with pytest.raises(ValueError, match="printable ASCII"):
        RuntimeCoordinator().register_node("n", "http://h:1", auth_token=token)
