"""The coordinator's health probe: HTTP/1.1 framing, keep-alive reuse, errors, TLS."""

from __future__ import annotations

import contextlib
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import pytest
import trustme
from anyio.abc import SocketStream

from promptise_asgi.client import NodeError, NodeTimeoutError, NodeUnreachableError
from promptise_asgi.coordinator._probe import HealthProbe
from promptise_asgi.runtime import AgentRuntime, ProcessConfig
from promptise_asgi.transport import RuntimeTransport

Handler = Callable[[SocketStream], Awaitable[None]]


@asynccontextmanager
async def raw_server(handler: Handler) -> AsyncIterator[str]:
    """A TCP server on loopback whose every connection is handed to `handler`."""
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
    port = listener.extra(anyio.abc.SocketAttribute.local_port)

    async def tolerant(stream: SocketStream) -> None:
        # The probe may hang up whenever it likes (it closes idle connections at aclose()).
        with contextlib.suppress(anyio.EndOfStream, anyio.BrokenResourceError):
            await handler(stream)

    async with listener, anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, tolerant)
        yield f"http://127.0.0.1:{port}"
        tg.cancel_scope.cancel()


async def read_request(stream: SocketStream) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        data += await stream.receive()
    return data


def answer(*responses: bytes, close: bool = False) -> Handler:
    async def handler(stream: SocketStream) -> None:
        async with stream:
            for response in responses:
                await read_request(stream)
                await stream.send(response)
            if not close:
                await anyio.sleep_forever()

    return handler


OK = b'{"status":"healthy","node_id":"n","process_count":1}'


@pytest.mark.parametrize(
    "response",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(OK) + OK,
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n10\r\n"
        + OK[:16]
        + b"\r\n"
        + b"%x;ext=1\r\n" % len(OK[16:])
        + OK[16:]
        + b"\r\n0\r\nX-Trailer: 1\r\n\r\n",
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(OK) + OK,
    ],
    ids=["content-length", "chunked", "interim-100"],
)
async def test_framings(response: bytes) -> None:
    async with raw_server(answer(response)) as url:
        probe = HealthProbe(timeout=5)
        assert (await probe.health(url))["node_id"] == "n"
        await probe.aclose()


async def test_body_framed_by_connection_close() -> None:
    async with raw_server(answer(b"HTTP/1.0 200 OK\r\n\r\n" + OK, close=True)) as url:
        probe = HealthProbe(timeout=5)
        assert (await probe.health(url))["process_count"] == 1
        await probe.aclose()


async def test_keep_alive_is_reused_and_a_stale_connection_is_replaced() -> None:
    connections = 0
    response = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(OK) + OK

    async def handler(stream: SocketStream) -> None:
        nonlocal connections
        connections += 1
        async with stream:
            await read_request(stream)
            await stream.send(response)
            await read_request(stream)
            await stream.send(response)
            # Then the "node" closes the kept-alive connection, as servers do after an idle timeout.

    async with raw_server(handler) as url:
        probe = HealthProbe(timeout=5)
        for _ in range(3):
            assert (await probe.health(url))["status"] == "healthy"
        assert connections == 2  # two answers on the first connection, then a fresh one
        await probe.forget(url)
        await probe.aclose()


async def test_sends_the_path_prefix_host_and_token() -> None:
    seen: list[bytes] = []

    async def handler(stream: SocketStream) -> None:
        async with stream:
            seen.append(await read_request(stream))
            await stream.send(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % len(OK) + OK)

    async with raw_server(handler) as url:
        probe = HealthProbe(timeout=5)
        await probe.health(f"{url}/runtime", "tok")
        await probe.aclose()
    request = seen[0]
    assert request.startswith(b"GET /runtime/health HTTP/1.1\r\n")
    assert b"\r\nAuthorization: Bearer tok\r\n" in request
    assert f"\r\nHost: {url.removeprefix('http://')}\r\n".encode() in request


@pytest.mark.parametrize(
    ("response", "error", "message"),
    [
        (
            b'HTTP/1.1 401 Unauthorized\r\nContent-Length: 24\r\n\r\n{"error": "Unauthorized"}',
            NodeError,
            "Unauthorized",
        ),
        (b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 10\r\n\r\n<html>x</h", NodeError, "<html>"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\n[1]", NodeError, "not a JSON object"),
        (b"SSH-2.0-OpenSSH\r\n\r\n", NodeUnreachableError, "not an HTTP"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n", NodeUnreachableError, "Content-Length"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", NodeUnreachableError, "chunk size"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1\r\nabc", NodeUnreachableError, "CRLF"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nshort", NodeUnreachableError, "IncompleteRead"),
    ],
)
async def test_bad_answers(response: bytes, error: type[Exception], message: str) -> None:
    async with raw_server(answer(response, close=True)) as url:
        probe = HealthProbe(timeout=5)
        with pytest.raises(error, match=message) as info:
            await probe.health(url)
        if isinstance(info.value, NodeError):
            assert info.value.status_code in (200, 401, 502)
        await probe.aclose()


async def test_no_content_answers_and_oversized_bodies() -> None:
    probe = HealthProbe(timeout=5)
    async with raw_server(answer(b"HTTP/1.1 204 No Content\r\n\r\n", close=True)) as url:
        with pytest.raises(NodeError, match="not a JSON object"):
            await probe.health(url)
    big = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n%x\r\n" % (2 * 1024 * 1024)
    async with raw_server(answer(big, close=True)) as url:
        with pytest.raises(NodeUnreachableError, match="too large"):
            await probe.health(url)
    await probe.aclose()


async def test_silent_and_dead_nodes() -> None:
    async def silent(stream: SocketStream) -> None:
        async with stream:
            await anyio.sleep_forever()

    async with raw_server(silent) as url:
        quick = HealthProbe(timeout=0.2)
        with pytest.raises(NodeTimeoutError, match=r"within 0\.2s"):
            await quick.health(url)
        await quick.aclose()
    probe = HealthProbe(timeout=5)
    with pytest.raises(NodeUnreachableError) as info:
        await probe.health("http://127.0.0.1:1")
    await probe.aclose()
    assert not isinstance(info.value, NodeTimeoutError)
    assert "127.0.0.1:1/health" in str(info.value)


@pytest.mark.parametrize("anyio_backend", ["asyncio", "trio"])
async def test_https_node_with_tls_passed_through_runtime_transport(tmp_path: Path) -> None:
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    certfile, keyfile = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.private_key_and_cert_chain_pem.write_to_path(str(certfile))
    cert.private_key_pem.write_to_path(str(keyfile))
    client_context = ssl.create_default_context()
    ca.configure_trust(client_context)
    runtime = AgentRuntime()
    await runtime.add_process("worker", ProcessConfig())
    async with RuntimeTransport(
        runtime, port=0, node_id="tls-node", ssl_certfile=str(certfile), ssl_keyfile=str(keyfile)
    ) as node:
        assert node.url.startswith("https://")
        probe = HealthProbe(timeout=5, ssl_context=client_context)
        assert (await probe.health(node.url))["node_id"] == "tls-node"
        await probe.aclose()
        untrusting = HealthProbe(timeout=5)
        with pytest.raises(NodeUnreachableError):
            await untrusting.health(node.url)  # the system CAs do not trust our test CA
        await untrusting.aclose()
