"""The wire side of the etcd registry: etcd's v3 JSON gateway over one httpx pool, with endpoint failover.

Holds `EtcdGateway` (POST a JSON body to the first endpoint that answers, or open a streaming answer), the etcd
error classes, and the gateway's encoding rules (base64 keys, prefix range ends, one-line stream results). Knows
nothing of nodes, leases or registries: `promptise_asgi.etcd` builds the registry on top of it.
"""

from __future__ import annotations

import base64
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx

from .._errors import EtcdError, EtcdUnavailableError, answer_error_text
from .._validation import redact_url

__all__ = [
    "LEASE_NOT_FOUND",
    "EtcdError",
    "EtcdGateway",
    "EtcdUnavailableError",
    "b64",
    "close_stream",
    "prefix_range_end",
    "watch_message",
]

LEASE_NOT_FOUND = "requested lease not found"
# gRPC UNAVAILABLE (no leader, member stopping) arrives as HTTP 503: another member may well answer.
_RETRY_ON_NEXT_ENDPOINT = frozenset({503})


def b64(raw: bytes) -> str:
    """Bytes as the gateway wants them in JSON (keys, values, range ends)."""
    return base64.b64encode(raw).decode("ascii")


def prefix_range_end(prefix: bytes) -> bytes:
    """The smallest key greater than every key starting with `prefix` (etcd's `range_end` for a prefix).

    The prefix is UTF-8, which never contains the byte 0xff, so its last byte can always be incremented.
    """
    return prefix[:-1] + bytes([prefix[-1] + 1])


class EtcdGateway:
    """One httpx pool to a list of etcd endpoints; requests go to the one that last answered, then the others.

    Args:
        endpoints: parsed client URLs (see `parse_endpoints`), in failover order.
        timeout: seconds allowed per request (a stream waits for data without limit).
        transport: an httpx transport to use instead of the network (tests).
    """

    def __init__(
        self, endpoints: tuple[str, ...], timeout: float, transport: httpx.AsyncBaseTransport | None = None
    ) -> None:
        self._endpoints = endpoints
        self._timeout = timeout
        self._client = httpx.AsyncClient(timeout=timeout, transport=transport)
        self._preferred = 0

    @property
    def endpoints(self) -> tuple[str, ...]:
        """The endpoints, passwords hidden."""
        return tuple(redact_url(e) for e in self._endpoints)

    async def aclose(self) -> None:
        """Close the connection pool."""
        await self._client.aclose()

    def _order(self) -> list[int]:
        count = len(self._endpoints)
        return [(self._preferred + i) % count for i in range(count)]

    async def post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """POST `body` as JSON to `path` on the first endpoint that answers and return the decoded result.

        Raises:
            EtcdUnavailableError: every endpoint refused, broke, timed out or answered 503.
            EtcdError: an endpoint answered with another error, or with something unreadable.
        """
        failures: list[str] = []
        for index in self._order():
            endpoint = self._endpoints[index]
            try:
                response = await self._client.post(endpoint + path, json=body)
            except httpx.TransportError as exc:
                failures.append(f"{redact_url(endpoint)}: {type(exc).__name__} {exc}".rstrip())
                continue
            if response.status_code in _RETRY_ON_NEXT_ENDPOINT:
                failures.append(f"{redact_url(endpoint)}: {error_text(response)}")
                continue
            self._preferred = index
            return decode(response, redact_url(endpoint))
        raise EtcdUnavailableError(self.endpoints, "; ".join(failures))

    async def open_stream(self, path: str, body: dict[str, Any]) -> httpx.Response:
        """POST `body` and return the streaming answer (to be closed by the caller); same failover as `post`.

        Raises:
            EtcdUnavailableError: no endpoint accepted the stream (an HTTP error counts as unavailable here).
        """
        failures: list[str] = []
        for index in self._order():
            endpoint = self._endpoints[index]
            request = self._client.build_request(
                "POST", endpoint + path, json=body, timeout=httpx.Timeout(self._timeout, read=None)
            )
            try:
                response = await self._client.send(request, stream=True)
            except httpx.TransportError as exc:
                failures.append(f"{redact_url(endpoint)}: {type(exc).__name__} {exc}".rstrip())
                continue
            if response.is_error:
                await response.aread()
                failures.append(f"{redact_url(endpoint)}: {error_text(response)}")
                await response.aclose()
                continue
            self._preferred = index
            return response
        raise EtcdUnavailableError(self.endpoints, "; ".join(failures))


async def close_stream(lines: AsyncIterator[str] | None, response: httpx.Response | None) -> None:
    """Close a streaming answer and the line iterator reading it."""
    if response is not None:
        await response.aclose()
    if lines is not None:
        # httpx reads lines through a chain of async generators; closing only the outer one leaves the inner
        # ones to the garbage collector, which trio reports as a ResourceWarning. Once the response is closed,
        # reading on fails at the bottom of the chain, which finishes every generator in it.
        with contextlib.suppress(Exception):  # StopAsyncIteration included
            while True:
                await anext(lines)


def error_text(response: httpx.Response) -> str:
    """etcd's own error message from a failed answer, else the status and the start of the body."""
    return f"HTTP {response.status_code}: {answer_error_text(response.content, response.status_code)}"


def decode(response: httpx.Response, endpoint: str) -> dict[str, Any]:
    """The result object of a gateway answer; `EtcdError` for an HTTP error, an error line or garbage."""
    if response.is_error:
        raise EtcdError(response.status_code, error_text(response), endpoint)
    # Streaming RPCs (keep-alive) answer with one `{"result": ...}` or `{"error": ...}` line.
    text = response.text.strip().splitlines()[0] if response.text.strip() else ""
    try:
        body = json.loads(text)
    except ValueError:
        raise EtcdError(response.status_code, f"unreadable answer {text[:200]!r}", endpoint) from None
    if not isinstance(body, dict):
        raise EtcdError(response.status_code, f"unreadable answer {text[:200]!r}", endpoint)
    if "error" in body:
        error = body["error"]
        message = error.get("message", str(error)) if isinstance(error, dict) else str(error)
        raise EtcdError(response.status_code, str(message), endpoint)
    result = body.get("result", body)
    return result if isinstance(result, dict) else {}


def watch_message(line: str) -> dict[str, Any] | None:
    """The `result` of one watch stream line; None for a blank line. A stream error ends the stream."""
    if not line.strip():
        return None
    try:
        body = json.loads(line)
    except ValueError:
        raise httpx.DecodingError(f"unreadable watch message {line[:200]!r}") from None
    if not isinstance(body, dict) or "result" not in body or not isinstance(body["result"], dict):
        raise httpx.DecodingError(f"watch stream error {line[:200]!r}")
    result: dict[str, Any] = body["result"]
    return result
