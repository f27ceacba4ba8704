"""RuntimeTransport on real loopback sockets: uvicorn (asyncio) and hypercorn (asyncio and trio)."""

from __future__ import annotations

import signal
import socket
from typing import Any

import anyio
import httpx
import pytest
from support import wait_for

from promptise_asgi.runtime import AgentRuntime, ProcessConfig, TriggerEvent
from promptise_asgi.transport import RuntimeTransport

pytestmark = pytest.mark.slow


async def make_runtime(**config: Any) -> AgentRuntime:
    runtime = AgentRuntime()
    await runtime.add_process("worker", ProcessConfig(**config))
    return runtime


@pytest.fixture(
    params=[
        pytest.param(("asyncio", "uvicorn"), id="asyncio-uvicorn"),
        pytest.param(("asyncio", "hypercorn"), id="asyncio-hypercorn"),
        pytest.param(("trio", "hypercorn"), id="trio-hypercorn"),
    ]
)
def server_case(request: pytest.FixtureRequest) -> tuple[str, str]:
    return request.param  # type: ignore[no-any-return]


@pytest.fixture
def anyio_backend(server_case: tuple[str, str]) -> str:
    return server_case[0]


@pytest.fixture
def server(server_case: tuple[str, str]) -> str:
    return server_case[1]


async def test_serves_on_a_free_port_and_stops(server: str) -> None:
    runtime = await make_runtime()
    transport = RuntimeTransport(runtime, port=0, node_id="n1", server=server)  # type: ignore[arg-type]
    assert not transport.running
    await transport.start()
    port = transport.port
    try:
        assert port != 0
        assert transport.url == f"http://127.0.0.1:{transport.port}"
        assert runtime.get_process("worker").state == "running"
        async with httpx.AsyncClient(base_url=transport.url) as client:
            assert (await client.get("/health")).json() == {"status": "healthy", "node_id": "n1", "process_count": 1}
            assert (await client.get("/readyz")).status_code == 200
    finally:
        await transport.stop()
    assert not transport.running
    assert runtime.get_process("worker").state == "stopped"
    with pytest.raises(httpx.ConnectError):
        async with httpx.AsyncClient() as client:
            await client.get(f"http://127.0.0.1:{port}/health")


async def test_async_with_and_events_round_trip(server: str) -> None:
    seen: list[dict[str, Any]] = []

    async def handler(event: TriggerEvent) -> None:
        seen.append(event.payload)

    runtime = await make_runtime(handler=handler)
    async with RuntimeTransport(runtime, port=0, server=server, auth_token="tok") as transport:  # type: ignore[arg-type]
        headers = {"Authorization": "Bearer tok"}
        async with httpx.AsyncClient(base_url=transport.url, headers=headers) as client:
            response = await client.post("/processes/worker/event", json={"payload": {"n": 1}})
            assert response.status_code == 202
            with anyio.fail_after(10):
                while not seen:
                    await anyio.sleep(0.01)
    assert seen == [{"n": 1}]


async def test_port_in_use_is_a_clear_oserror_and_nothing_runs(server: str) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        runtime = await make_runtime()
        transport = RuntimeTransport(runtime, port=port, server=server)  # type: ignore[arg-type]
        with pytest.raises(OSError, match=f"127.0.0.1:{port}"):
            await transport.start()
    assert not transport.running
    assert runtime.get_process("worker").state == "created"


async def test_graceful_stop_lets_in_flight_requests_finish(server: str) -> None:
    entered = anyio.Event()
    release = anyio.Event()

    runtime = await make_runtime()
    transport = RuntimeTransport(runtime, port=0, server=server)  # type: ignore[arg-type]
    app = transport.app

    # A route that blocks until released, added to the node app for this test.
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    async def slow(request: Any) -> JSONResponse:
        entered.set()
        await release.wait()
        return JSONResponse({"done": True})

    app.router.routes.append(Route("/slow", slow))
    results: list[int] = []
    await transport.start()
    async with httpx.AsyncClient(base_url=transport.url) as client, anyio.create_task_group() as tg:

        async def call() -> None:
            results.append((await client.get("/slow")).status_code)

        tg.start_soon(call)
        await entered.wait()
        tg.start_soon(transport.stop)
        await wait_for(lambda: transport.app.state.node.phase == "draining")  # stop() is under way
        release.set()
    assert results == [200]
    assert not transport.running


async def test_does_not_take_over_signal_handlers(server: str) -> None:
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    runtime = await make_runtime()
    async with RuntimeTransport(runtime, port=0, server=server):  # type: ignore[arg-type]
        during = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    assert during == before


async def test_oversized_streaming_body_is_refused_before_it_is_all_sent(server: str) -> None:
    runtime = await make_runtime()
    async with RuntimeTransport(runtime, port=0, server=server, max_body_bytes=4096) as transport:  # type: ignore[arg-type]
        stream = await anyio.connect_tcp("127.0.0.1", transport.port)
        async with stream:
            await stream.send(
                b"POST /processes/worker/event HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
            )
            for _ in range(8):
                await stream.send(b"400\r\n" + b"x" * 1024 + b"\r\n")
            # No terminating chunk: the body is still "streaming" when the server answers.
            with anyio.fail_after(10):
                head = await stream.receive()
    assert head.startswith(b"HTTP/1.1 413")
    assert runtime.get_process("worker").status()["events_received"] == 0


async def test_start_twice_is_an_error(server: str) -> None:
    runtime = await make_runtime()
    async with RuntimeTransport(runtime, port=0, server=server) as transport:  # type: ignore[arg-type]
        with pytest.raises(RuntimeError, match="already running"):
            await transport.start()


class TestConstruction:
    @pytest.mark.parametrize("host", ["0.0.0.0", "192.0.2.10", "::", "node1.example"])
    def test_non_loopback_without_token_is_refused(self, host: str) -> None:
        with pytest.raises(ValueError, match="auth_token"):
            RuntimeTransport(AgentRuntime(), host=host)

    @pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "::1"])
    def test_loopback_without_token_is_fine(self, host: str) -> None:
        assert RuntimeTransport(AgentRuntime(), host=host).host == host

    def test_opt_outs(self) -> None:
        opted_out = RuntimeTransport(AgentRuntime(), host="0.0.0.0", allow_unauthenticated=True)
        with_token = RuntimeTransport(AgentRuntime(), host="0.0.0.0", auth_token="t")
        assert opted_out.host == with_token.host == "0.0.0.0"
        assert opted_out.url.startswith("http://127.0.0.1:")  # reachable from this machine, not 0.0.0.0

    @pytest.mark.parametrize("token", ["", "   "])
    def test_blank_token(self, token: str) -> None:
        with pytest.raises(ValueError, match="auth_token"):
            RuntimeTransport(AgentRuntime(), auth_token=token)

    def test_bad_server_and_half_tls(self) -> None:
        with pytest.raises(ValueError, match="server"):
            RuntimeTransport(AgentRuntime(), server="gunicorn")  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="ssl_keyfile"):
            RuntimeTransport(AgentRuntime(), ssl_certfile="cert.pem")

    def test_url_and_repr(self) -> None:
        transport = RuntimeTransport(AgentRuntime(), host="::1", port=9100, node_id="n")
        assert transport.url == "http://[::1]:9100"
        assert transport.node_id == "n"
        assert repr(transport) == "RuntimeTransport(node='n', url='http://[::1]:9100', running=False)"
        wildcard = RuntimeTransport(AgentRuntime(), host="0.0.0.0", port=1, auth_token="secret-token")
        assert wildcard.url == "http://127.0.0.1:1"
        assert "secret-token" not in repr(wildcard)


@pytest.mark.parametrize("anyio_backend", ["trio"])
async def test_uvicorn_under_trio_is_refused_clearly() -> None:
    transport = RuntimeTransport(AgentRuntime(), port=0, server="uvicorn")
    with pytest.raises(RuntimeError, match="hypercorn"):
        await transport.start()


@pytest.mark.parametrize("anyio_backend", ["asyncio", "trio"])
async def test_a_server_that_dies_after_app_startup_is_a_failed_start(monkeypatch: pytest.MonkeyPatch) -> None:
    from promptise_asgi._server import _runner as _server

    async def dies_after_startup(self: Any, app: Any) -> None:
        self.ready.set()  # the app's lifespan completed...
        raise OSError("...then the server could not create its listeners")

    monkeypatch.setattr(_server._ServerRunner, "_hypercorn_serve", dies_after_startup)
    runtime = await make_runtime()
    transport = RuntimeTransport(runtime, port=0, server="hypercorn")
    with pytest.raises(RuntimeError, match="could not create its listeners"):
        await transport.start()
    assert not transport.running
    assert runtime.get_process("worker").state == "stopped"


async def test_a_start_cancelled_part_way_leaves_nothing_running(server: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C while a node starts: the server it launched stops, its socket closes and its runtime stops."""
    from promptise_asgi._server import _runner as _server

    reached = anyio.Event()

    async def never_answers(self: Any) -> None:
        reached.set()  # the server is running and has started the app: the latest point start() can be cut
        await anyio.sleep_forever()

    monkeypatch.setattr(_server._ServerRunner, "_first_answer", never_answers)
    runtime = await make_runtime()
    transport = RuntimeTransport(runtime, port=0, server=server)  # type: ignore[arg-type]
    runners: list[_server._ServerRunner] = []

    class Recorded(_server._ServerRunner):
        def __init__(self, *args: Any) -> None:
            super().__init__(*args)
            runners.append(self)

    monkeypatch.setattr(_server, "_ServerRunner", Recorded)
    async with anyio.create_task_group() as tg:
        tg.start_soon(transport.start)
        await reached.wait()
        port = transport.port
        tg.cancel_scope.cancel()
    assert not transport.running
    assert runners[0].finished.is_set()  # the detached server task is done, not left to the event loop's end
    assert runtime.get_process("worker").state == "stopped"
    with pytest.raises(httpx.ConnectError):
        async with httpx.AsyncClient() as client:
            await client.get(f"http://127.0.0.1:{port}/health")


async def test_a_server_that_never_answers_is_stopped_when_start_gives_up(
    server: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from promptise_asgi._server import _runner as _server

    async def never_answers(self: Any) -> None:
        await anyio.sleep_forever()

    monkeypatch.setattr(_server._ServerRunner, "_first_answer", never_answers)
    monkeypatch.setattr(_server, "READY_TIMEOUT", 0.2)
    runtime = await make_runtime()
    transport = RuntimeTransport(runtime, port=0, server=server)  # type: ignore[arg-type]
    with pytest.raises(RuntimeError, match=r"server failed to start: no answer within 0\.2s"):
        await transport.start()
    assert not transport.running and runtime.get_process("worker").state == "stopped"


def test_unreadable_tls_files_fail_before_anything_starts(tmp_path: Any) -> None:
    missing = str(tmp_path / "missing.pem")
    transport = RuntimeTransport(AgentRuntime(), port=0, ssl_certfile=missing, ssl_keyfile=missing)

    async def start() -> None:
        await transport.start()

    with pytest.raises(ValueError, match="cannot load TLS certificate"):
        anyio.run(start)
    assert not transport.running
