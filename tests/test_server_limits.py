"""Server-level size and time limits (SPEC 18, "Sizes and times") on real loopback sockets.

Each test reproduces an attack with small sizes and a short `read_timeout`, on every server the project drives:
uvicorn with httptools, uvicorn with h11 (what it uses when the `fast` extra is not installed), and hypercorn on
asyncio and on trio.
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import anyio.abc
import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from promptise_asgi.runtime import AgentRuntime, ProcessConfig
from promptise_asgi.transport import AppServer, RuntimeTransport

pytestmark = pytest.mark.slow

READ_TIMEOUT = 0.5
# How late a deadline may fire: the watchdog's tick, plus scheduling on a busy 2-core machine.
SLACK = 1.0


@pytest.fixture(
    params=[
        pytest.param(("asyncio", "uvicorn"), id="asyncio-uvicorn"),
        pytest.param(("asyncio", "uvicorn-h11"), id="asyncio-uvicorn-h11"),
        pytest.param(("asyncio", "hypercorn"), id="asyncio-hypercorn"),
        pytest.param(("trio", "hypercorn"), id="trio-hypercorn"),
    ]
)
def server_case(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> tuple[str, str]:
    backend, server = request.param
    if server == "uvicorn-h11":
        monkeypatch.setitem(sys.modules, "httptools", None)  # as if the `fast` extra were not installed
        server = "uvicorn"
    return backend, server


@pytest.fixture
def anyio_backend(server_case: tuple[str, str]) -> str:
    return server_case[0]


@pytest.fixture
def server(server_case: tuple[str, str]) -> str:
    return server_case[1]


class LimitsApp:
    """A small app whose routes play the legitimate clients and handlers the limits must leave alone."""

    def __init__(self) -> None:
        self.held = 0
        self.release = anyio.Event()
        self.app = Starlette(
            routes=[
                Route("/ok", self.ok),
                Route("/upload", self.upload, methods=["POST"]),
                Route("/slow", self.slow, methods=["GET", "POST"]),
                Route("/late-reader", self.late_reader, methods=["POST"]),
                Route("/stream", self.stream),
                Route("/hold", self.hold),
            ]
        )

    async def ok(self, request: Request) -> JSONResponse:
        return JSONResponse({"ok": True})

    async def upload(self, request: Request) -> JSONResponse:
        return JSONResponse({"bytes": len(await request.body())})

    async def slow(self, request: Request) -> JSONResponse:
        body = await request.body()
        await anyio.sleep(2 * READ_TIMEOUT)
        return JSONResponse({"bytes": len(body)})

    async def late_reader(self, request: Request) -> JSONResponse:
        await anyio.sleep(2 * READ_TIMEOUT)  # busy before it reads the body
        return JSONResponse({"bytes": len(await request.body())})

    async def stream(self, request: Request) -> StreamingResponse:
        async def chunks() -> AsyncIterator[bytes]:
            for chunk in (b"a", b"b", b"c"):
                yield chunk
                if chunk != b"c":
                    await anyio.sleep(2 * READ_TIMEOUT)  # quiet for longer than read_timeout, like an SSE stream

        return StreamingResponse(chunks(), media_type="text/plain")

    async def hold(self, request: Request) -> JSONResponse:
        self.held += 1
        await self.release.wait()
        return JSONResponse({"ok": True})


@asynccontextmanager
async def serving(server: str, app: LimitsApp, **limits: Any) -> AsyncIterator[AppServer]:
    served = AppServer(app.app, port=0, server=server, **limits)  # type: ignore[arg-type]
    await served.start()
    try:
        yield served
    finally:
        await served.stop()


def head(path: str = "/ok", method: str = "GET", **headers: str) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1"]
    lines += [f"{name.replace('_', '-')}: {value}" for name, value in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


async def read_until_closed(stream: anyio.abc.ByteStream, within: float) -> bytes:
    """Everything the server sends until it closes the connection; fails if it is still open after `within` s."""
    data = b""
    with anyio.fail_after(within):
        while True:
            try:
                data += await stream.receive()
            except (anyio.EndOfStream, anyio.BrokenResourceError):  # a reset is a close too
                return data


async def read_response(stream: anyio.abc.ByteStream, within: float = 10) -> tuple[int, bytes]:
    """The status and body of one response with a content-length."""
    data = b""
    with anyio.fail_after(within):
        while b"\r\n\r\n" not in data:
            data += await stream.receive()
        head_bytes, _, body = data.partition(b"\r\n\r\n")
        lines = head_bytes.decode("latin-1").split("\r\n")
        length = next(int(line.split(":")[1]) for line in lines if line.lower().startswith("content-length:"))
        while len(body) < length:
            body += await stream.receive()
    return int(lines[0].split()[1]), body


def status_of(response: bytes) -> int:
    return int(response.split(b" ", 2)[1]) if response.startswith(b"HTTP/1.1 ") else 0


async def test_header_limit_is_64_kib(server: str) -> None:
    async with serving(server, LimitsApp()) as served:
        async with await anyio.connect_tcp("127.0.0.1", served.port) as stream:
            # In two pieces, as a head that size often arrives: what counts is the whole head, not one read.
            request = head(X_Big="a" * 60_000)
            await stream.send(request[:30_000])
            await anyio.sleep(0.05)
            await stream.send(request[30_000:])
            assert await read_response(stream) == (200, b'{"ok":true}')
        async with await anyio.connect_tcp("127.0.0.1", served.port) as stream:
            await stream.send(head(X_Big="a" * 100_000))
            answer = await read_until_closed(stream, within=10)
        assert status_of(answer) in (431, 400), answer[:200]


async def test_an_endless_header_is_cut_off_while_other_requests_are_served(server: str) -> None:
    async with serving(server, LimitsApp()) as served:
        async with await anyio.connect_tcp("127.0.0.1", served.port) as attacker:
            # A head that never ends: the server must not buffer it until it does.
            await attacker.send(b"GET /ok HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: " + b"a" * 100_000)
            async with httpx.AsyncClient(base_url=served.url) as client:
                assert (await client.get("/ok")).status_code == 200
            answer = await read_until_closed(attacker, within=10)
        assert answer == b"" or status_of(answer) in (431, 400), answer[:200]
        async with httpx.AsyncClient(base_url=served.url) as client:
            assert (await client.get("/ok")).status_code == 200


async def test_silent_and_dripping_connections_are_closed_after_read_timeout(server: str) -> None:
    closed_after: dict[str, float] = {}

    async def silent(port: int) -> None:
        start = anyio.current_time()
        async with await anyio.connect_tcp("127.0.0.1", port) as stream:
            assert await read_until_closed(stream, within=READ_TIMEOUT + SLACK) == b""
        closed_after["silent"] = anyio.current_time() - start

    async def dripping(port: int) -> None:
        # Slowloris: keep sending header lines, never the blank line that ends the head.
        start = anyio.current_time()
        async with await anyio.connect_tcp("127.0.0.1", port) as stream, anyio.create_task_group() as tg:

            async def drip() -> None:
                await stream.send(b"GET /ok HTTP/1.1\r\nHost: 127.0.0.1\r\n")
                while True:
                    await anyio.sleep(READ_TIMEOUT / 5)
                    await stream.send(b"X-Drip: 1\r\n")

            tg.start_soon(drip)
            try:
                assert await read_until_closed(stream, within=READ_TIMEOUT + SLACK) == b""
            finally:
                tg.cancel_scope.cancel()
        closed_after["dripping"] = anyio.current_time() - start

    async with serving(server, LimitsApp(), read_timeout=READ_TIMEOUT) as served, anyio.create_task_group() as tg:
        tg.start_soon(silent, served.port)
        tg.start_soon(dripping, served.port)
    # Not before read_timeout either: a client gets its full allowance.
    assert min(closed_after.values()) >= READ_TIMEOUT - 0.1, closed_after


async def stall_mid_body(port: int, path: str, body: str) -> bytes:
    """Send a request head and 1000 bytes of a much longer body, then nothing: the server's answer, once it closes."""
    async with await anyio.connect_tcp("127.0.0.1", port) as stream:
        start = anyio.current_time()
        if body == "content-length":
            await stream.send(head(path, "POST", Content_Length="1000000") + b'{"payload": "' + b"x" * 987)
        else:
            await stream.send(head(path, "POST", Transfer_Encoding="chunked") + b"3e8\r\n" + b"x" * 1000 + b"\r\n")
        answer = await read_until_closed(stream, within=READ_TIMEOUT + SLACK)
        assert anyio.current_time() - start >= READ_TIMEOUT - 0.1
    assert answer == b"" or status_of(answer) == 408, answer[:200]
    if answer:
        assert json.loads(answer.partition(b"\r\n\r\n")[2]) == {"error": "Request body timed out"}
    return answer


async def test_a_stalled_body_is_cut_off_and_the_node_keeps_serving(server: str) -> None:
    runtime = AgentRuntime()
    await runtime.add_process("worker", ProcessConfig())
    options: dict[str, Any] = {"server": server, "read_timeout": READ_TIMEOUT}
    async with RuntimeTransport(runtime, port=0, **options) as transport:
        await stall_mid_body(transport.port, "/processes/worker/event", "content-length")
        async with httpx.AsyncClient(base_url=transport.url) as client:
            assert (await client.get("/health")).status_code == 200
    assert runtime.get_process("worker").status()["events_received"] == 0


async def test_a_stalled_chunked_body_is_cut_off_even_if_the_app_fails_on_the_disconnect(server: str) -> None:
    # Starlette's request.body() raises ClientDisconnect, and its error middleware would answer 500.
    async with serving(server, LimitsApp(), read_timeout=READ_TIMEOUT) as served:
        await stall_mid_body(served.port, "/upload", "chunked")
        async with httpx.AsyncClient(base_url=served.url) as client:
            assert (await client.get("/ok")).status_code == 200


async def test_a_slow_but_steady_body_is_not_cut_off(server: str) -> None:
    chunks = 8  # 8 x read_timeout / 3: the whole body takes well over read_timeout
    async with serving(server, LimitsApp(), read_timeout=READ_TIMEOUT) as served:
        async with await anyio.connect_tcp("127.0.0.1", served.port) as stream:
            await stream.send(head("/upload", "POST", Content_Length=str(chunks * 100)))
            for _ in range(chunks):
                await anyio.sleep(READ_TIMEOUT / 3)
                await stream.send(b"x" * 100)
            assert await read_response(stream) == (200, b'{"bytes":800}')


async def test_a_client_waiting_for_the_app_to_read_is_not_cut_off(server: str) -> None:
    # The app is busy for longer than read_timeout before it reads: a client that has sent all the server would
    # take (the server stops reading a large body), or waits for "100 Continue", is not stalling.
    results: dict[str, tuple[int, bytes]] = {}
    async with serving(server, LimitsApp(), read_timeout=READ_TIMEOUT) as served, anyio.create_task_group() as tg:

        async def large_body() -> None:
            async with await anyio.connect_tcp("127.0.0.1", served.port) as stream:
                await stream.send(head("/late-reader", "POST", Content_Length="1000000") + b"x" * 1_000_000)
                results["large body"] = await read_response(stream)

        async def expect_continue() -> None:
            async with await anyio.connect_tcp("127.0.0.1", served.port) as stream:
                await stream.send(head("/late-reader", "POST", Content_Length="3", Expect="100-continue"))
                with anyio.fail_after(10):
                    assert (await stream.receive()).startswith(b"HTTP/1.1 100 ")
                await stream.send(b"abc")
                results["100-continue"] = await read_response(stream)

        tg.start_soon(large_body)
        tg.start_soon(expect_continue)
    assert results == {"large body": (200, b'{"bytes":1000000}'), "100-continue": (200, b'{"bytes":3}')}


async def test_long_responses_are_not_cut_off(server: str) -> None:
    # The client has sent everything and waits: a slow handler or a quiet stream is not a stalled client.
    results: dict[str, tuple[int, str]] = {}
    async with serving(server, LimitsApp(), read_timeout=READ_TIMEOUT) as served:
        async with httpx.AsyncClient(base_url=served.url, timeout=10) as client, anyio.create_task_group() as tg:

            async def call(name: str, method: str, path: str, content: bytes | None = None) -> None:
                response = await client.request(method, path, content=content)
                results[name] = (response.status_code, response.text)

            tg.start_soon(call, "get", "GET", "/slow")
            tg.start_soon(call, "post", "POST", "/slow", b"x" * 1000)
            tg.start_soon(call, "stream", "GET", "/stream")
    assert results == {"get": (200, '{"bytes":0}'), "post": (200, '{"bytes":1000}'), "stream": (200, "abc")}


async def test_limit_concurrency_answers_503_beyond_the_limit(server: str) -> None:
    app = LimitsApp()
    statuses: list[int] = []
    async with serving(server, app, limit_concurrency=2) as served:
        async with httpx.AsyncClient(base_url=served.url, timeout=10) as client:
            async with anyio.create_task_group() as tg:

                async def held() -> None:
                    statuses.append((await client.get("/hold")).status_code)

                tg.start_soon(held)
                tg.start_soon(held)
                with anyio.fail_after(10):
                    while app.held < 2:
                        await anyio.sleep(0.01)
                extra = [(await client.get("/ok")).status_code for _ in range(2)]
                app.release.set()
            assert extra == [503, 503]
            assert statuses == [200, 200]
            assert (await client.get("/ok")).status_code == 200  # the slots are free again


class TestKeywords:
    def test_defaults_are_the_spec_values(self) -> None:
        limits = AppServer(LimitsApp().app).limits
        assert (limits.limit_concurrency, limits.max_header_bytes, limits.read_timeout) == (2048, 65536, 10.0)

    @pytest.mark.parametrize(
        ("keyword", "value"),
        [
            ("limit_concurrency", 0),
            ("limit_concurrency", True),
            ("limit_concurrency", 2.5),
            ("max_header_bytes", -1),
            ("max_header_bytes", False),
            ("max_header_bytes", "64k"),
            ("read_timeout", 0),
            ("read_timeout", True),
            ("read_timeout", float("nan")),
            ("read_timeout", float("inf")),
            ("read_timeout", "10"),
        ],
    )
    def test_bad_values_are_refused_by_name(self, keyword: str, value: object) -> None:
        with pytest.raises(ValueError, match=keyword):
            AppServer(LimitsApp().app, **{keyword: value})
        with pytest.raises(ValueError, match=keyword):
            RuntimeTransport(AgentRuntime(), **{keyword: value})

    def test_runtime_transport_passes_them_to_its_server(self) -> None:
        transport = RuntimeTransport(AgentRuntime(), limit_concurrency=7, max_header_bytes=1000, read_timeout=2)
        limits = transport._server.limits
        assert (limits.limit_concurrency, limits.max_header_bytes, limits.read_timeout) == (7, 1000, 2)


class _Transport(asyncio.Transport):
    """Just enough of a transport for a uvicorn protocol to run without a socket."""

    def __init__(self) -> None:
        super().__init__()
        self.closed = False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default

    def write(self, data: Any) -> None:
        pass

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
@pytest.mark.parametrize("impl", ["httptools", "h11"])
async def test_uvicorn_internals_the_limits_rely_on(impl: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # _LimitedProtocol reads uvicorn's per-connection state; a uvicorn release that renames or moves any of it
    # must fail here, not silently switch a limit off.
    import uvicorn
    from uvicorn.protocols.http.h11_impl import H11Protocol
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    from uvicorn.server import ServerState

    from promptise_asgi._server._limits import ServerLimits, uvicorn_protocol

    base = {"httptools": HttpToolsProtocol, "h11": H11Protocol}[impl]
    if impl == "h11":
        monkeypatch.setitem(sys.modules, "httptools", None)
    assert base in uvicorn_protocol(ServerLimits()).__mro__

    started: list[object] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        started.append(app)

    config = uvicorn.Config(app, lifespan="off", log_config=None)
    config.load()
    state = ServerState()
    protocol: Any = base(config=config, server_state=state, app_state={}, _loop=asyncio.get_running_loop())
    transport = _Transport()
    protocol.connection_made(transport)
    assert (protocol.transport, protocol.loop, protocol.cycle) == (transport, asyncio.get_running_loop(), None)
    assert protocol.flow.read_paused is False

    async def swapped(scope: Any, receive: Any, send: Any) -> None:
        started.append(swapped)

    protocol.app = swapped  # the app a request is started with is read from `app` when its head completes
    protocol.data_received(
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\nExpect: 100-continue\r\n\r\nabc"  # 3 of 10 bytes
    )
    cycle = protocol.cycle
    assert (cycle.more_body, cycle.response_complete, cycle.waiting_for_100_continue) == (True, False, True)
    with anyio.fail_after(5):
        while not started:
            await anyio.sleep(0.01)
    assert started == [swapped]
    protocol.connection_lost(None)
