"""`HealthProbe`: `GET /health` to many nodes over kept-alive HTTP/1.1 connections, the coordinator's hot path.

A cluster-wide health round is one small GET per node. Through httpx each costs about a millisecond of CPU, so
a round over 100 nodes spends ~100 ms of coordinator CPU before any node's latency counts; written directly on
anyio streams it costs a few tens of microseconds. Everything else the coordinator does (control calls, events,
broadcasts) goes through `NodeClient` and httpx. This module speaks just enough HTTP/1.1 for one GET: status
line, headers, a body framed by Content-Length, chunked encoding or connection close. It knows nothing of the
coordinator beyond the error classes it raises, which are the client's.
"""

from __future__ import annotations

import ssl
from typing import Any
from urllib.parse import urlsplit

import anyio
import orjson
from anyio.abc import ByteStream
from anyio.streams.buffered import BufferedByteReceiveStream

from .._errors import NodeError, NodeTimeoutError, NodeUnreachableError, answer_error_text
from .._request_id import CURRENT_REQUEST_ID

__all__ = ["HealthProbe"]

_MAX_HEAD = 64 * 1024
_MAX_BODY = 1024 * 1024
_IDLE_PER_NODE = 2


class _Connection:
    __slots__ = ("buffered", "stream")

    def __init__(self, stream: ByteStream) -> None:
        self.stream = stream
        self.buffered = BufferedByteReceiveStream(stream)


class _ProtocolError(Exception):
    """The peer's answer is not HTTP/1.1 as this probe reads it."""


class HealthProbe:
    """Fetch `/health` from nodes, keeping a couple of idle connections per node between rounds.

    Args:
        timeout: seconds one probe may take in all (connect, send, receive).
        ssl_context: the context for https nodes (default: the system's CA bundle).
    """

    def __init__(self, *, timeout: float, ssl_context: ssl.SSLContext | None = None) -> None:
        self.timeout = timeout
        self._ssl_context = ssl_context
        self._idle: dict[tuple[str, str, int], list[_Connection]] = {}

    async def health(self, url: str, token: str | None = None) -> dict[str, Any]:
        """Return the node's decoded `/health` answer (see `get`)."""
        return await self.get(url, "/health", token)

    async def get(self, url: str, path: str, token: str | None = None) -> dict[str, Any]:
        """Return the node's decoded answer to `GET <url><path>`, a JSON object.

        Raises:
            NodeError: a non-2xx answer (with the node's message) or one that is not a JSON object.
            NodeTimeoutError: no complete answer within `timeout`.
            NodeUnreachableError: the connection failed, or the answer was not readable HTTP.
        """
        parts = urlsplit(url)
        host = parts.hostname or ""
        secure = parts.scheme == "https"
        port = parts.port or (443 if secure else 80)
        key = (parts.scheme, host, port)
        target = f"{url}{path}"
        authority = parts.netloc.rpartition("@")[2]
        request = f"GET {parts.path}{path} HTTP/1.1\r\nHost: {authority}\r\nAccept: application/json\r\n"
        if token:
            request += f"Authorization: Bearer {token}\r\n"
        request_id = CURRENT_REQUEST_ID.get()
        if request_id is not None:
            request += f"X-Request-ID: {request_id}\r\n"
        raw = (request + "\r\n").encode("latin-1")
        try:
            with anyio.fail_after(self.timeout):
                status, body = await self._exchange(key, secure, raw)
        except TimeoutError:
            raise NodeTimeoutError(target, f"no complete answer within {self.timeout}s") from None
        except (OSError, anyio.BrokenResourceError, anyio.EndOfStream, anyio.IncompleteRead, _ProtocolError) as exc:
            raise NodeUnreachableError(target, f"{type(exc).__name__}: {exc}".rstrip(": ")) from None
        try:
            answer = orjson.loads(body)
        except orjson.JSONDecodeError:
            answer = None
        if not 200 <= status < 300:
            raise NodeError(status, answer_error_text(body, status), target)
        if not isinstance(answer, dict):
            raise NodeError(status, "the node's answer is not a JSON object", target)
        return answer

    async def _exchange(self, key: tuple[str, str, int], secure: bool, request: bytes) -> tuple[int, bytes]:
        idle = self._idle.setdefault(key, [])
        while idle:
            # A kept-alive connection the node closed since last time fails at once: try the next, then a new one.
            connection = idle.pop()
            try:
                return await self._round_trip(key, connection, request)
            except (OSError, anyio.BrokenResourceError, anyio.EndOfStream, anyio.IncompleteRead):
                await anyio.aclose_forcefully(connection.stream)
        _, host, port = key
        if secure:
            if self._ssl_context is None:
                self._ssl_context = ssl.create_default_context()
            stream: ByteStream = await anyio.connect_tcp(host, port, ssl_context=self._ssl_context, tls_hostname=host)
        else:
            stream = await anyio.connect_tcp(host, port)
        return await self._round_trip(key, _Connection(stream), request)

    async def _round_trip(
        self, key: tuple[str, str, int], connection: _Connection, request: bytes
    ) -> tuple[int, bytes]:
        reusable = False
        try:
            await connection.stream.send(request)
            status, body, reusable = await _read_response(connection.buffered)
        finally:
            idle = self._idle.setdefault(key, [])
            if reusable and len(idle) < _IDLE_PER_NODE:
                idle.append(connection)
            else:
                await anyio.aclose_forcefully(connection.stream)
        return status, body

    async def forget(self, url: str) -> None:
        """Close the idle connections kept for `url` (a node that left the cluster)."""
        parts = urlsplit(url)
        secure = parts.scheme == "https"
        key = (parts.scheme, parts.hostname or "", parts.port or (443 if secure else 80))
        for connection in self._idle.pop(key, []):
            await anyio.aclose_forcefully(connection.stream)

    async def aclose(self) -> None:
        """Close every idle connection."""
        idle, self._idle = self._idle, {}
        for connections in idle.values():
            for connection in connections:
                await anyio.aclose_forcefully(connection.stream)


async def _read_response(reader: BufferedByteReceiveStream) -> tuple[int, bytes, bool]:
    while True:
        head = await reader.receive_until(b"\r\n\r\n", _MAX_HEAD)
        status_line, _, header_block = head.partition(b"\r\n")
        version, _, rest = status_line.partition(b" ")
        code = rest[:3]
        if not version.startswith(b"HTTP/1.") or not code.isdigit():
            raise _ProtocolError(f"not an HTTP/1.x status line: {status_line[:80]!r}")
        status = int(code)
        if status >= 200 or status == 101:
            break  # 1xx interim answers (other than a protocol switch) precede the real one
    headers: dict[bytes, bytes] = {}
    for line in header_block.split(b"\r\n"):
        name, sep, value = line.partition(b":")
        if sep:
            headers[name.strip().lower()] = value.strip()
    keep_alive = version == b"HTTP/1.1" and headers.get(b"connection", b"").lower() != b"close"
    if status in (204, 304):
        return status, b"", keep_alive
    if b"chunked" in headers.get(b"transfer-encoding", b"").lower():
        return status, await _read_chunked(reader), keep_alive
    length = headers.get(b"content-length")
    if length is not None:
        if not length.isdigit() or int(length) > _MAX_BODY:
            raise _ProtocolError(f"unusable Content-Length {length[:20]!r}")
        return status, await reader.receive_exactly(int(length)), keep_alive
    body = bytearray()  # framed by the end of the connection
    try:
        while len(body) <= _MAX_BODY:
            body += await reader.receive()
    except anyio.EndOfStream:
        return status, bytes(body), False
    raise _ProtocolError("body too large")


async def _read_chunked(reader: BufferedByteReceiveStream) -> bytes:
    body = bytearray()
    while True:
        size_line = await reader.receive_until(b"\r\n", 1024)
        size_text = size_line.split(b";", 1)[0].strip()
        try:
            size = int(size_text, 16)
        except ValueError:
            raise _ProtocolError(f"bad chunk size {size_text[:20]!r}") from None
        if size == 0:
            while await reader.receive_until(b"\r\n", _MAX_HEAD):
                pass  # trailers, up to the blank line
            return bytes(body)
        if len(body) + size > _MAX_BODY:
            raise _ProtocolError("body too large")
        body += await reader.receive_exactly(size)
        if await reader.receive_exactly(2) != b"\r\n":
            raise _ProtocolError("chunk not followed by CRLF")
