"""HTTP plumbing shared by the node app and the coordinator app.

The JSON response class, the one place where exceptions become `{"error": ...}` answers, bounded body
reading, and the request guard (bearer tokens, loopback Host/Origin checks). Knows Starlette, not the runtime.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import orjson
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.types import ASGIApp, ExceptionHandler, Receive, Scope, Send

from ._validation import clean_token

__all__ = [
    "PROBE_PATHS",
    "EventBody",
    "JSONResponse",
    "NodeGuard",
    "dumps",
    "error_response",
    "exception_handlers",
    "guard_options",
    "is_loopback_host",
    "normalize_tokens",
    "parse_event_body",
    "read_json_object",
    "response_for_exception",
]

logger = logging.getLogger("promptise_asgi.http")

_LOOPBACK_NAMES = frozenset({"localhost", "localhost.", "ip6-localhost", "ip6-loopback"})


_ORJSON_OPTIONS = orjson.OPT_NON_STR_KEYS


def dumps(content: Any) -> bytes:
    """Encode `content` as compact UTF-8 JSON (orjson: several times faster than `json` on every answer).

    NaN and infinities become `null`; objects JSON does not know (a foreign runtime's status may hold some)
    are written as their `str()` rather than failing the whole answer.
    """
    return orjson.dumps(content, default=str, option=_ORJSON_OPTIONS)


class JSONResponse(Response):
    """A compact JSON response (`application/json`)."""

    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return dumps(content)


def error_response(status_code: int, message: str, headers: Mapping[str, str] | None = None) -> JSONResponse:
    """Return the error body every route uses: `{"error": message}`."""
    return JSONResponse({"error": message}, status_code=status_code, headers=headers)


def response_for_exception(exc: Exception) -> Response:
    """The one mapping from an exception raised while serving to the JSON answer the client gets.

    An `HTTPException` keeps its status, message and headers; anything else is a bare 500: the client learns
    that something failed, never how (the server log has the traceback).
    """
    if isinstance(exc, HTTPException):
        return error_response(exc.status_code, str(exc.detail), exc.headers)
    return error_response(500, "Internal server error")


async def _handle(request: Request, exc: Exception) -> Response:
    return response_for_exception(exc)


def exception_handlers() -> dict[Any, ExceptionHandler]:
    """Starlette exception handlers that turn every failure into a JSON error body."""
    return {HTTPException: _handle, Exception: _handle}


async def read_json_object(request: Request, max_bytes: int) -> dict[str, Any]:
    """Read the request body as a JSON object, refusing more than `max_bytes` while streaming.

    Raises:
        HTTPException: 413 past the limit, 400 for a body that is not JSON or not an object.
    """
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise HTTPException(413, f"Body larger than {max_bytes} bytes")
    # Read the ASGI messages directly: cheaper than Request.stream() on the hot event path, and it stops at
    # the first chunk past the limit instead of reading the rest.
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await request.receive()
        if message["type"] != "http.request":
            raise ClientDisconnect()
        chunk: bytes = message.get("body", b"")
        size += len(chunk)
        if size > max_bytes:
            raise HTTPException(413, f"Body larger than {max_bytes} bytes")
        chunks.append(chunk)
        if not message.get("more_body", False):
            break
    try:
        data = orjson.loads(b"".join(chunks))
    except orjson.JSONDecodeError:  # also raised for bytes that are not UTF-8
        raise HTTPException(400, "Invalid JSON body") from None
    if not isinstance(data, dict):
        raise HTTPException(400, "Body must be a JSON object")
    return data


@dataclass(frozen=True, slots=True)
class EventBody:
    """The fields of an event body (SPEC 3), validated, with their defaults filled in."""

    trigger_id: str
    trigger_type: str
    payload: dict[str, Any]
    metadata: dict[str, Any]


def parse_event_body(body: dict[str, Any]) -> EventBody:
    """Validate an event body in the SPEC's order: payload, metadata, then the trigger fields.

    Every key is optional: `payload`/`metadata` default to `{}`, `trigger_id`/`trigger_type` to `"remote"`
    (also when empty); numbers and booleans given as trigger fields become text.

    Raises:
        HTTPException: 400 naming the field that is not a JSON object (or not text).
    """
    payload = _object_field(body, "payload")
    metadata = _object_field(body, "metadata")
    return EventBody(_text_field(body, "trigger_id"), _text_field(body, "trigger_type"), payload, metadata)


def _object_field(body: dict[str, Any], key: str) -> dict[str, Any]:
    value = body.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise HTTPException(400, f"{key} must be a JSON object")
    return value


def _text_field(body: dict[str, Any], key: str) -> str:
    value = body.get(key)
    if value is None or value == "":
        return "remote"
    if isinstance(value, dict | list):
        raise HTTPException(400, f"{key} must be a string")
    return str(value)


PROBE_PATHS = ("/health", "/livez", "/readyz")


def guard_options(
    tokens: tuple[bytes, ...], *, allow_unauthenticated: bool, trusted_hosts: Collection[str]
) -> dict[str, Any]:
    """The one rule both apps' guards follow: probes open, tokens if any, else the loopback guard unless
    the user opted out explicitly."""
    return {
        "tokens": tokens,
        "open_paths": PROBE_PATHS,
        "trusted_hosts": trusted_hosts,
        "enabled": bool(tokens) or not allow_unauthenticated,
    }


def normalize_tokens(auth_token: str | Sequence[str] | None) -> tuple[bytes, ...]:
    """Validate `auth_token` (one string, several for rotation, or None) and return the tokens as bytes.

    Surrounding whitespace is removed (a token read from a file or an environment variable often ends in a
    newline; the presented credential is stripped too, so the two must match).

    Raises:
        ValueError: a token is blank or not printable ASCII, or the sequence is empty.
    """
    if auth_token is None:
        return ()
    tokens = [auth_token] if isinstance(auth_token, str) else list(auth_token)
    if not tokens:
        raise ValueError("auth_token must be a non-empty string, a non-empty list of them, or None")
    return tuple(clean_token(t).encode() for t in tokens)


def is_loopback_host(host: str) -> bool:
    """True for `localhost`, 127.0.0.0/8 and ::1 (with or without brackets)."""
    host = host.strip().lower().strip("[]")
    if host in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _host_of_header(value: str) -> str:
    value = value.strip()
    if value.startswith("["):
        return value[1 : value.find("]")] if "]" in value else value
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


def _host_of_origin(origin: str) -> str | None:
    scheme, sep, rest = origin.partition("://")
    if not sep or scheme not in ("http", "https"):
        return None
    return _host_of_header(rest.split("/", 1)[0])


class NodeGuard:
    """Pure ASGI middleware: bearer-token auth, or loopback Host/Origin checks when there is no token.

    With tokens, every path except `open_paths` needs `Authorization: Bearer <token>` (scheme
    case-insensitive, constant-time compare against every token). Without tokens, unless `enabled` is
    False, a non-loopback `Host` gets 421 and a non-loopback `Origin` (including `null`) gets 403, so a web
    page cannot drive a local node (DNS rebinding and cross-site requests).
    """

    def __init__(
        self,
        app: ASGIApp | None,
        *,
        tokens: Iterable[bytes] = (),
        open_paths: Collection[str] = (),
        trusted_hosts: Collection[str] = (),
        enabled: bool = True,
    ) -> None:
        self.app = app
        self.tokens = tuple(tokens)
        self.open_paths = frozenset(open_paths)
        self.trusted_hosts = frozenset(h.lower() for h in trusted_hosts)
        self.enabled = enabled
        self._verdicts: dict[tuple[bytes, bool], bool] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        assert self.app is not None, "a NodeGuard built without an app only checks requests"
        refusal = self.refusal(scope) if scope["type"] == "http" else None
        if refusal is None:
            await self.app(scope, receive, send)
        else:
            await refusal(scope, receive, send)

    def refusal(self, scope: Scope) -> Response | None:
        """Return the answer refusing this HTTP request, or None when it may proceed."""
        if not self.enabled:
            return None
        if self.tokens:
            if _route_path(scope) in self.open_paths or self._authorized(scope):
                return None
            return error_response(401, "Unauthorized", {"WWW-Authenticate": "Bearer"})
        host = origin = None
        for key, value in scope["headers"]:
            if key == b"host":
                host = value
            elif key == b"origin":
                origin = value
        if host is not None and not self._allowed(host, origin=False):
            return error_response(421, "Misdirected request")
        if origin is not None and not self._allowed(origin, origin=True):
            return error_response(403, "Cross-origin request refused")
        return None

    def _allowed(self, value: bytes, *, origin: bool) -> bool:
        # Every request asks this about the same few Host/Origin values: remember the answers (bounded).
        key = (value, origin)
        allowed = self._verdicts.get(key)
        if allowed is None:
            text = value.decode("latin-1")
            host = _host_of_origin(text) if origin else _host_of_header(text)
            allowed = host is not None and (is_loopback_host(host) or host.lower() in self.trusted_hosts)
            if len(self._verdicts) >= 1024:
                self._verdicts.clear()
            self._verdicts[key] = allowed
        return allowed

    def _authorized(self, scope: Scope) -> bool:
        for key, value in scope["headers"]:
            if key == b"authorization":
                scheme, _, credentials = value.partition(b" ")
                if scheme.lower() != b"bearer":
                    return False
                presented = credentials.strip()
                # Compare against every token so timing does not reveal which one (or whether any) matched.
                matched = False
                for token in self.tokens:
                    matched |= hmac.compare_digest(presented, token)
                return matched
        return False


def _route_path(scope: Scope) -> str:
    path: str = scope["path"]
    root_path: str = scope.get("root_path", "")
    if root_path and path.startswith(root_path):
        return path[len(root_path) :] or "/"
    return path
