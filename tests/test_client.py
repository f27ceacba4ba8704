from __future__ import annotations

import socket
from collections.abc import Iterator
from typing import Any

import anyio
import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Mount, Route
from support import black_hole, dead_url, free_port

from promptise_asgi import _errors
from promptise_asgi.client import (
    CoordinatorClient,
    CoordinatorError,
    CoordinatorTimeoutError,
    CoordinatorUnreachableError,
    NodeClient,
    NodeError,
    NodeTimeoutError,
    NodeUnreachableError,
)
from promptise_asgi.coordinator import RuntimeCoordinator, create_coordinator_app
from promptise_asgi.discovery import RegistryDiscovery
from promptise_asgi.runtime import AgentRuntime, ProcessConfig, TriggerConfig
from promptise_asgi.transport import RuntimeTransport, create_transport_app

TOKEN = "s3cret-token-value"


class FakeNode:
    """A small stand-in for the SPEC section 3 node API, recording what it received."""

    def __init__(self, node_id: str = "n1", token: str | None = None) -> None:
        self.node_id = node_id
        self.token = token
        self.processes: dict[str, str] = {"worker": "running", "my worker": "stopped", "café-ü": "stopped"}
        self.seen: list[dict[str, Any]] = []
        self.hang = anyio.Event()
        routes = [
            Route("/health", self.health),
            Route("/status", self.status),
            Route("/processes", self.list_processes),
            Route("/processes/{name}/status", self.process_status),
            Route("/processes/{name}/{action}", self.action, methods=["POST"]),
            Route("/plain-error", self.plain_error),
            Route("/huge-error", self.huge_error),
            Route("/json-without-error-key", self.json_without_error_key),
            Route("/empty", self.empty),
            Route("/not-json", self.not_json),
            Route("/list", self.a_list),
            Route("/hang", self.hang_forever),
        ]
        self.app = Starlette(routes=routes)

    def record(self, request: Request) -> None:
        self.seen.append(
            {
                "method": request.method,
                "raw_path": request.scope["raw_path"],
                "root_path": request.scope.get("root_path", ""),
                "authorization": request.headers.get("authorization"),
                "params": dict(request.path_params),
            }
        )

    def denied(self, request: Request) -> Response | None:
        if self.token is not None and request.headers.get("authorization") != f"Bearer {self.token}":
            return JSONResponse({"error": "Unauthorized"}, 401, headers={"WWW-Authenticate": "Bearer"})
        return None

    async def health(self, request: Request) -> Response:
        self.record(request)
        body = {"status": "healthy", "node_id": self.node_id, "process_count": len(self.processes)}
        return JSONResponse(body)

    async def status(self, request: Request) -> Response:
        self.record(request)
        return self.denied(request) or JSONResponse({"node_id": self.node_id, "process_count": 3})

    async def list_processes(self, request: Request) -> Response:
        self.record(request)
        listed = [{"name": n, "state": s, "process_id": f"id-{n}"} for n, s in self.processes.items()]
        return self.denied(request) or JSONResponse({"node_id": self.node_id, "processes": listed})

    async def process_status(self, request: Request) -> Response:
        self.record(request)
        name = request.path_params["name"]
        if name not in self.processes:
            return JSONResponse({"error": f"Process '{name}' not found"}, 404)
        return self.denied(request) or JSONResponse({"name": name, "state": self.processes[name]})

    async def action(self, request: Request) -> Response:
        self.record(request)
        if (denied := self.denied(request)) is not None:
            return denied
        name, action = request.path_params["name"], request.path_params["action"]
        if name not in self.processes:
            return JSONResponse({"error": f"Process '{name}' not found"}, 404)
        if action == "event":
            body = await request.json()
            self.seen[-1]["body"] = body
            return JSONResponse({"status": "injected", "event_id": "e-1", "process": name}, 202)
        if action == "start":
            changed = self.processes[name] != "running"
            self.processes[name] = "running"
            return JSONResponse({"status": "started", "name": name, "changed": changed})
        if action == "stop":
            changed = self.processes[name] != "stopped"
            self.processes[name] = "stopped"
            return JSONResponse({"status": "stopped", "name": name, "changed": changed})
        if action == "restart":
            return JSONResponse({"status": "restarted", "name": name})
        return JSONResponse({"error": "Not Found"}, 404)

    async def plain_error(self, request: Request) -> Response:
        return PlainTextResponse("upstream went away\n", 502)

    async def huge_error(self, request: Request) -> Response:
        return PlainTextResponse("x" * 10_000, 500)

    async def json_without_error_key(self, request: Request) -> Response:
        return JSONResponse({"detail": "nope"}, 409)

    async def empty(self, request: Request) -> Response:
        return Response(status_code=204)

    async def not_json(self, request: Request) -> Response:
        return PlainTextResponse("hello", 200)

    async def a_list(self, request: Request) -> Response:
        return JSONResponse([1, 2, 3])

    async def hang_forever(self, request: Request) -> Response:
        await anyio.sleep_forever()
        raise AssertionError("unreachable")  # pragma: no cover


@pytest.fixture
def node() -> FakeNode:
    return FakeNode()


def client_for(node: FakeNode, url: str = "http://testserver", **kwargs: Any) -> NodeClient:
    return NodeClient(url, transport=httpx.ASGITransport(app=node.app), **kwargs)


# --- the API methods -----------------------------------------------------------------------------------------


async def test_every_method_returns_the_nodes_json(node: FakeNode) -> None:
    async with client_for(node) as client:
        assert await client.health() == {"status": "healthy", "node_id": "n1", "process_count": 3}
        assert await client.status() == {"node_id": "n1", "process_count": 3}
        listed = await client.processes()
        assert [p["name"] for p in listed["processes"]] == ["worker", "my worker", "café-ü"]
        assert await client.process_status("worker") == {"name": "worker", "state": "running"}
        assert await client.start("worker") == {"status": "started", "name": "worker", "changed": False}
        assert await client.stop("worker") == {"status": "stopped", "name": "worker", "changed": True}
        assert await client.restart("worker") == {"status": "restarted", "name": "worker"}
        injected = await client.inject_event("worker", {"x": 1})
        assert injected == {"status": "injected", "event_id": "e-1", "process": "worker"}
    methods = [(s["method"], s["raw_path"]) for s in node.seen]
    assert methods == [
        ("GET", b"/health"),
        ("GET", b"/status"),
        ("GET", b"/processes"),
        ("GET", b"/processes/worker/status"),
        ("POST", b"/processes/worker/start"),
        ("POST", b"/processes/worker/stop"),
        ("POST", b"/processes/worker/restart"),
        ("POST", b"/processes/worker/event"),
    ]


async def test_inject_event_sends_the_event_body(node: FakeNode) -> None:
    async with client_for(node) as client:
        await client.inject_event("worker")
        await client.inject_event(
            "worker", {"order": 42}, trigger_id="t-9", trigger_type="webhook", metadata={"source": "crm"}
        )
    assert node.seen[0]["body"] == {"trigger_id": "remote", "trigger_type": "remote", "payload": {}, "metadata": {}}
    assert node.seen[1]["body"] == {
        "trigger_id": "t-9",
        "trigger_type": "webhook",
        "payload": {"order": 42},
        "metadata": {"source": "crm"},
    }


@pytest.mark.parametrize(
    ("name", "raw"),
    [
        ("my worker", b"/processes/my%20worker/status"),
        ("café-ü", b"/processes/caf%C3%A9-%C3%BC/status"),
        ("a?b#c&d=e+f", b"/processes/a%3Fb%23c%26d%3De%2Bf/status"),
        ("..", b"/processes/%2E%2E/status"),
        (".", b"/processes/%2E/status"),
        ("100%", b"/processes/100%25/status"),
    ],
)
async def test_names_are_sent_as_one_percent_encoded_segment(node: FakeNode, name: str, raw: bytes) -> None:
    node.processes[name] = "running"
    async with client_for(node) as client:
        assert await client.process_status(name) == {"name": name, "state": "running"}
        assert (await client.start(name))["name"] == name
    assert node.seen[0]["raw_path"] == raw
    assert node.seen[0]["params"] == {"name": name}


async def test_base_url_with_a_mount_prefix(node: FakeNode) -> None:
    outer = Starlette(routes=[Mount("/runtime", app=node.app)])
    for base in ("http://testserver/runtime", "http://testserver/runtime/"):
        async with NodeClient(base, transport=httpx.ASGITransport(app=outer)) as client:
            assert client.url == "http://testserver/runtime"
            assert (await client.health())["node_id"] == "n1"
            assert (await client.stop("my worker"))["name"] == "my worker"
    assert node.seen[1]["raw_path"] == b"/runtime/processes/my%20worker/stop"
    assert node.seen[1]["root_path"] == "/runtime"


# --- errors --------------------------------------------------------------------------------------------------


async def test_404_raises_node_error_with_the_servers_message(node: FakeNode) -> None:
    async with client_for(node) as client:
        with pytest.raises(NodeError) as caught:
            await client.start("ghost")
    assert caught.value.status_code == 404
    assert caught.value.message == "Process 'ghost' not found"
    assert caught.value.url == "http://testserver/processes/ghost/start"
    assert "Process 'ghost' not found" in str(caught.value)


@pytest.mark.parametrize(
    ("path", "status", "message"),
    [
        ("/plain-error", 502, "upstream went away"),
        ("/json-without-error-key", 409, '{"detail":"nope"}'),
        ("/no-such-route", 404, "Not Found"),
    ],
)
async def test_error_without_json_error_key_uses_the_body_text(
    node: FakeNode, path: str, status: int, message: str
) -> None:
    async with client_for(node) as client:
        with pytest.raises(NodeError) as caught:
            await client.request("GET", path)
    assert (caught.value.status_code, caught.value.message) == (status, message)


async def test_a_huge_error_body_is_cut_short(node: FakeNode) -> None:
    async with client_for(node) as client:
        with pytest.raises(NodeError) as caught:
            await client.request("GET", "/huge-error")
    assert caught.value.status_code == 500
    assert caught.value.message == "x" * 500 + "..."


async def test_a_2xx_that_is_not_json_raises_node_error(node: FakeNode) -> None:
    async with client_for(node) as client:
        with pytest.raises(NodeError, match="not valid JSON") as caught:
            await client.request("GET", "/not-json")
    assert caught.value.status_code == 200


async def test_request_returns_any_json_and_none_for_an_empty_body(node: FakeNode) -> None:
    async with client_for(node) as client:
        assert await client.request("GET", "/list") == [1, 2, 3]
        assert await client.request("GET", "empty") is None
        assert await client.request("GET", "health") == await client.health()


async def test_methods_refuse_a_body_that_is_not_an_object() -> None:
    async def accepted_list(request: Request) -> Response:
        return JSONResponse(["not", "an", "object"], 202)

    node = FakeNode()
    node.app.router.routes.insert(0, Route("/status", accepted_list))
    async with client_for(node) as client:
        with pytest.raises(NodeError, match="expected a JSON object, got list") as caught:
            await client.status()
    assert (caught.value.status_code, caught.value.url) == (202, "http://testserver/status")


@pytest.fixture
def silent_listener() -> Iterator[int]:
    """A socket that completes TCP handshakes (kernel backlog) but never reads or answers."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(8)
        yield sock.getsockname()[1]


async def test_dead_port_raises_unreachable_naming_the_url() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    async with NodeClient(url, auth_token=TOKEN, timeout=10) as client:
        with pytest.raises(NodeUnreachableError) as caught:
            await client.health()
    assert not isinstance(caught.value, NodeTimeoutError)
    assert caught.value.url == f"{url}/health"
    assert url in str(caught.value)
    assert TOKEN not in str(caught.value)


async def test_silent_server_raises_timeout(silent_listener: int) -> None:
    url = f"http://127.0.0.1:{silent_listener}"
    async with NodeClient(url, auth_token=TOKEN, timeout=0.2) as client:
        with pytest.raises(NodeTimeoutError) as caught:
            await client.status()
    assert isinstance(caught.value, NodeUnreachableError)
    assert caught.value.url == f"{url}/status"
    assert TOKEN not in str(caught.value)


async def test_an_app_that_never_answers_raises_timeout(node: FakeNode) -> None:
    # httpx's own timeouts do not cover an in-process ASGI app: the client's overall deadline must.
    async with client_for(node, timeout=0.2) as client:
        with pytest.raises(NodeTimeoutError, match=r"no complete answer within 0\.2s") as caught:
            await client.request("GET", "/hang")
    assert caught.value.url == "http://testserver/hang"


@pytest.mark.parametrize(
    ("raised", "expected"),
    [
        (httpx.ConnectTimeout("connect timed out"), NodeTimeoutError),
        (httpx.ReadTimeout("read timed out"), NodeTimeoutError),
        (httpx.PoolTimeout("pool timed out"), NodeTimeoutError),
        (httpx.ConnectError("connection refused"), NodeUnreachableError),
        (httpx.ReadError("connection reset by peer"), NodeUnreachableError),
        (httpx.RemoteProtocolError("server disconnected"), NodeUnreachableError),
    ],
)
async def test_transport_failures_are_mapped(raised: httpx.RequestError, expected: type[Exception]) -> None:
    def fail(request: httpx.Request) -> httpx.Response:
        raise raised

    async with NodeClient("http://h:1/rt", transport=httpx.MockTransport(fail)) as client:
        with pytest.raises(expected) as caught:
            await client.restart("w")
    assert type(caught.value) is expected
    assert isinstance(caught.value, NodeUnreachableError)
    assert caught.value.url == "http://h:1/rt/processes/w/restart"
    assert str(raised) in str(caught.value)


async def test_errors_are_the_shared_hierarchy() -> None:
    assert NodeError is _errors.NodeError
    assert NodeUnreachableError is _errors.NodeUnreachableError
    assert NodeTimeoutError is _errors.NodeTimeoutError


# --- auth, repr, ownership -----------------------------------------------------------------------------------


async def test_token_is_sent_as_bearer_and_never_shown() -> None:
    node = FakeNode(token=TOKEN)
    async with client_for(node, auth_token=TOKEN) as client:
        assert TOKEN not in repr(client)
        assert "auth_token='***'" in repr(client)
        assert (await client.status())["node_id"] == "n1"
    assert node.seen[0]["authorization"] == f"Bearer {TOKEN}"
    async with client_for(node, auth_token="wrong-token") as client:
        with pytest.raises(NodeError) as caught:
            await client.status()
    assert (caught.value.status_code, caught.value.message) == (401, "Unauthorized")
    assert "wrong-token" not in str(caught.value)
    async with client_for(node) as client:
        assert "auth_token=None" in repr(client)
        await client.health()
    assert node.seen[-1]["authorization"] is None


def test_repr_hides_a_password_in_the_url() -> None:
    client = NodeClient("http://admin:hunter2@h:1/runtime/", timeout=2)
    assert repr(client) == "NodeClient('http://admin:***@h:1/runtime', auth_token=None, timeout=2.0)"
    assert "hunter2" not in repr(client)
    assert repr(NodeClient("http://admin@h:1")) == "NodeClient('http://admin@h:1', auth_token=None, timeout=5.0)"


async def test_password_in_url_is_hidden_in_errors() -> None:
    async with NodeClient(f"http://admin:hunter2@127.0.0.1:{free_port()}") as client:
        with pytest.raises(NodeUnreachableError) as caught:
            await client.health()
    assert "hunter2" not in str(caught.value)
    assert "admin:***@" in caught.value.url


async def test_a_closed_client_cannot_be_used(node: FakeNode) -> None:
    client = client_for(node)
    await client.health()
    await client.aclose()
    with pytest.raises(RuntimeError):
        await client.health()


async def test_from_client_shares_one_pool_without_closing_it() -> None:
    first, second = FakeNode("first", token="t-first"), FakeNode("second")
    outer = Starlette(routes=[Mount("/a", app=first.app), Mount("/b", app=second.app)])
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=outer)) as shared:
        a = NodeClient.from_client(shared, "http://testserver/a/", auth_token="t-first")
        b = NodeClient.from_client(shared, "http://testserver/b", timeout=1.5)
        async with a, b:
            assert (await a.status())["node_id"] == "first"
            assert (await b.status())["node_id"] == "second"
        assert not shared.is_closed
        # Still usable after the per-node clients are closed: ownership stays with whoever built `shared`.
        assert (await a.health())["node_id"] == "first"
        assert "t-first" not in repr(a)
        assert repr(b) == "NodeClient('http://testserver/b', auth_token=None, timeout=1.5)"
    assert first.seen[0]["authorization"] == "Bearer t-first"
    assert second.seen[0]["authorization"] is None


async def test_from_client_timeout_applies_per_node() -> None:
    node = FakeNode()
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=node.app), timeout=30) as shared:
        client = NodeClient.from_client(shared, "http://testserver", timeout=0.2)
        with pytest.raises(NodeTimeoutError):
            await client.request("GET", "/hang")


# --- bad input -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("url", ["ftp://h:1", "h:1", "", "http://h:1/x?y=1", "http://h:1/#frag"])
def test_bad_url_is_refused(url: str) -> None:
    with pytest.raises(ValueError, match="url"):
        NodeClient(url)


@pytest.mark.parametrize("timeout", [0, -1, float("inf"), float("nan"), True, "5"])
def test_bad_timeout_is_refused(timeout: Any) -> None:
    with pytest.raises(ValueError, match="timeout"):
        NodeClient("http://h:1", timeout=timeout)


@pytest.mark.parametrize("token", ["", "   ", "tok\nen", "tökén", 42])
def test_bad_token_is_refused_without_echoing_it(token: Any) -> None:
    with pytest.raises(ValueError, match="auth_token") as caught:
        NodeClient("http://h:1", auth_token=token)
    if isinstance(token, str) and token.strip():
        assert token not in str(caught.value)
    with pytest.raises(ValueError, match="auth_token"):
        NodeClient.from_client(httpx.AsyncClient(), "http://h:1", auth_token=token)


@pytest.mark.parametrize("name", ["", None, 3])
async def test_bad_process_name_is_refused(node: FakeNode, name: Any) -> None:
    async with client_for(node) as client:
        with pytest.raises(ValueError, match="process name"):
            await client.start(name)
    assert node.seen == []


# --- against the real node app (SPEC section 3), in-process ----------------------------------------------------


async def test_against_the_real_node_app_mounted_with_a_token() -> None:
    runtime = AgentRuntime()
    for name in ("order worker", "café-ü"):
        await runtime.add_process(name, ProcessConfig(triggers=[TriggerConfig(type="event")]))
    node_app = create_transport_app(runtime, node_id="node-7", auth_token=TOKEN)
    site = Starlette(routes=[Mount("/runtime", app=node_app)])
    transport = httpx.ASGITransport(app=site)
    try:
        async with NodeClient("http://127.0.0.1:8000/runtime/", auth_token=TOKEN, transport=transport) as client:
            assert await client.health() == {"status": "healthy", "node_id": "node-7", "process_count": 2}
            assert (await client.status())["node_id"] == "node-7"
            listed = (await client.processes())["processes"]
            assert [p["name"] for p in listed] == ["order worker", "café-ü"]
            for name in ("order worker", "café-ü"):
                assert await client.start(name) == {"status": "started", "name": name, "changed": True}
                assert (await client.process_status(name))["name"] == name
            injected = await client.inject_event("café-ü", {"order": 1}, trigger_type="webhook")
            assert (injected["status"], injected["process"]) == ("injected", "café-ü")
            assert (await client.restart("order worker"))["status"] == "restarted"
            with pytest.raises(NodeError) as caught:
                await client.start("ghost")
            assert (caught.value.status_code, caught.value.message) == (404, "Process 'ghost' not found")
            assert caught.value.url == "http://127.0.0.1:8000/runtime/processes/ghost/start"
        async with NodeClient("http://127.0.0.1:8000/runtime", transport=transport) as anonymous:
            with pytest.raises(NodeError) as caught:
                await anonymous.status()
            assert (caught.value.status_code, caught.value.message) == (401, "Unauthorized")
    finally:
        await runtime.stop_all()


# --- CoordinatorClient --------------------------------------------------------------------------------------

BASE_URL = "http://coordinator:9000"


async def test_coordinator_client_mirrors_the_coordinator() -> None:
    """Registration with the node token, status and control with the operator's, through the real app."""
    coordinator = RuntimeCoordinator(discovery=RegistryDiscovery(ttl=30), auth_token="for-nodes")
    transport = httpx.ASGITransport(app=create_coordinator_app(coordinator, auth_token="for-ops"))
    runtime = AgentRuntime()
    await runtime.add_process("worker", ProcessConfig(triggers=[TriggerConfig(type="event")]))
    async with (
        RuntimeTransport(runtime, port=0, node_id="n1", auth_token="for-nodes") as node,
        CoordinatorClient(BASE_URL, auth_token="for-nodes", transport=transport) as as_node,
        CoordinatorClient(BASE_URL, auth_token="for-ops", transport=transport) as operator,
    ):
        assert (await as_node.register_node("n1", node.url + "/", {"zone": "a"}))["ttl"] == 30
        assert await as_node.heartbeat("n1") is True
        assert await as_node.heartbeat("unknown") is False
        assert [(n["node_id"], n["url"]) for n in await operator.nodes()] == [("n1", node.url)]
        assert (await operator.health())["role"] == "coordinator"
        status = await operator.cluster_status()
        assert status["healthy_nodes"] == 1 and status["total_processes"] == 1
        assert (await operator.stop_process_on_node("n1", "worker"))["status"] == "stopped"
        assert (await operator.start_process_on_node("n1", "worker"))["status"] == "started"
        assert (await operator.restart_process_on_node("n1", "worker"))["status"] == "restarted"
        injected = await operator.inject_event_on_node("n1", "worker", {"a": 1}, trigger_type="manual")
        assert injected["status"] == "injected"
        results = await operator.broadcast_event("worker", {"b": 2}, node_ids=["n1", "ghost"])
        assert results["n1"]["status"] == "injected" and results["ghost"]["status_code"] == 404
        assert list(await operator.broadcast_event("worker")) == ["n1"]
        with pytest.raises(CoordinatorError) as missing:
            await operator.start_process_on_node("n1", "no such process")
        assert missing.value.status_code == 404 and missing.value.message == "Process 'no such process' not found"
        assert await as_node.unregister_node("n1") is True
        assert await as_node.unregister_node("n1") is False
        assert await operator.nodes() == []
        assert repr(operator) == "CoordinatorClient('http://coordinator:9000', auth_token='***', timeout=5.0)"
        assert operator.url == BASE_URL
    await coordinator.aclose()


async def test_coordinator_client_errors_name_the_coordinator() -> None:
    app = create_coordinator_app(RuntimeCoordinator(), auth_token="right")
    async with CoordinatorClient(BASE_URL, auth_token="wrong", transport=httpx.ASGITransport(app=app)) as client:
        with pytest.raises(CoordinatorError) as refused:
            await client.cluster_status()
        with pytest.raises(ValueError, match="node_id"):
            await client.register_node("bad id!", "http://10.0.0.1:9100")
        with pytest.raises(ValueError, match="node_id"):
            await client.heartbeat("")
    assert isinstance(refused.value, NodeError) and refused.value.status_code == 401
    assert str(refused.value) == "coordinator at http://coordinator:9000 answered 401: Unauthorized"
    assert refused.value.url == "http://coordinator:9000/cluster/status"

    url = dead_url()
    async with CoordinatorClient(url) as client:
        with pytest.raises(CoordinatorUnreachableError) as down:
            await client.register_node("n1", "http://10.0.0.1:9100")
    assert isinstance(down.value, NodeUnreachableError) and not isinstance(down.value, NodeTimeoutError)
    assert str(down.value).startswith(f"coordinator unreachable at {url} (")
    assert "node" not in str(down.value)

    with black_hole() as silent:
        async with CoordinatorClient(silent, timeout=0.2) as client:
            with pytest.raises(CoordinatorTimeoutError) as slow:
                await client.nodes()
    assert isinstance(slow.value, NodeTimeoutError) and isinstance(slow.value, CoordinatorUnreachableError)
    assert str(slow.value).startswith(f"coordinator did not answer in time at {silent}")


async def test_coordinator_client_reads_odd_answers_as_empty() -> None:
    odd = Starlette(
        routes=[
            Route("/cluster/nodes", lambda request: JSONResponse({"nodes": "not a list"})),
            Route("/cluster/processes/{name}/event", lambda r: JSONResponse({"results": []}), methods=["POST"]),
        ]
    )
    async with CoordinatorClient(BASE_URL, transport=httpx.ASGITransport(app=odd)) as client:
        assert await client.nodes() == []
        assert await client.broadcast_event("x") == {}
        assert await client.request("GET", "cluster/nodes") == {"nodes": "not a list"}
