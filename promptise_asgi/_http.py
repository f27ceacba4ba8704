"""HTTP plumbing shared by the node app and the coordinator app.

The JSON response class, the one place where exceptions become `{"error": ...}` answers, bounded body
reading, and the request guard (bearer tokens and their scopes; without a token, loopback peers only).
Knows Starlette, not the runtime.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import orjson
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.types import ASGIApp, ExceptionHandler, Receive, Scope, Send

from ._validation import clean_token

__all__ = [
    "CONTROL",
    "NODE",
    "ONLY_CONTROL",
    "PROBE_PATHS",
    "EventBody",
    "JSONResponse",
    "RequestGuard",
    "Scopes",
    "dumps",
    "error_response",
    "exception_handlers",
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

# What a token may do. A token maps to one or more scopes; a route accepts some of them.
CONTROL = "control"  # the operator's token: every route of the app
NODE = "node"  # the token a coordinator shares with its nodes: registering, heartbeating, unregistering
Scopes = frozenset[str]
ONLY_CONTROL: Scopes = frozenset({CONTROL})
ScopeRule = Callable[[str, str], Scopes]

# Longest Host/Origin/peer value whose verdict is remembered: a guard must not be a place to park memory.
_MAX_CACHED_VALUE = 256
_MAX_CACHED_VERDICTS = 1024


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
    """True for `localhost`, 127.0.0.0/8 and ::1 (with or without brackets), and IPv4-mapped loopback."""
    host = host.strip().lower().strip("[]")
    if host in _LOOPBACK_NAMES:
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped.is_loopback
    return address.is_loopback


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


class _Verdicts:
    """Remembered yes/no answers about short header values, bounded in count and in size of what is kept."""

    __slots__ = ("_answers", "_decide")

    def __init__(self, decide: Callable[[str], bool]) -> None:
        self._decide = decide
        self._answers: dict[str, bool] = {}

    def __call__(self, value: str) -> bool:
        allowed = self._answers.get(value)
        if allowed is None:
            allowed = self._decide(value)
            if len(value) <= _MAX_CACHED_VALUE:
                if len(self._answers) >= _MAX_CACHED_VERDICTS:
                    self._answers.clear()
                self._answers[value] = allowed
        return allowed

    def __len__(self) -> int:
        return len(self._answers)

    def longest(self) -> int:
        """The length of the longest value remembered (0 when empty)."""
        return max(map(len, self._answers), default=0)


class RequestGuard:
    """Who may call which route of a node or coordinator app; `protect(app)` puts an ASGI app behind it.

    - The probes (`open_paths`) are open to anyone.
    - A route that some configured token could authorize needs `Authorization: Bearer <token>` (scheme
      case-insensitive, constant-time compare against every token): 401 without a valid one, 403 when the
      token is valid but its scope does not cover the route (`scopes_for(method, path)` names the scopes a
      route accepts; by default every route accepts the `control` scope, which every plain token has).
    - A route no configured token covers is served only to the machine itself, unless the user opted out
      with `allow_unauthenticated`: a peer (`scope["client"]`) that is not loopback gets 403 whatever its
      `Host` says, a non-loopback `Host` gets 421 and a non-loopback `Origin` (including `null`) gets 403,
      so neither the network nor a web page in a local browser can drive it.

    Args:
        tokens: token -> the scopes it grants (a plain sequence of tokens grants `control`).
        open_paths: paths served to anyone (the probes).
        trusted_hosts: `Host`/`Origin` names accepted besides loopback (a local reverse proxy's name).
        allow_unauthenticated: serve routes no token covers to any peer.
        scopes_for: the scopes a `(method, path)` accepts.
        what: how refusals name the protected thing ("node", "coordinator").
    """

    def __init__(
        self,
        *,
        tokens: Mapping[bytes, Collection[str]] | Iterable[bytes] = (),
        open_paths: Collection[str] = PROBE_PATHS,
        trusted_hosts: Collection[str] = (),
        allow_unauthenticated: bool = False,
        scopes_for: ScopeRule | None = None,
        what: str = "node",
    ) -> None:
        granted = tokens.items() if isinstance(tokens, Mapping) else ((token, ONLY_CONTROL) for token in tokens)
        self.tokens: tuple[tuple[bytes, Scopes], ...] = tuple((token, frozenset(s)) for token, s in granted)
        self._configured: Scopes = frozenset().union(*(scopes for _, scopes in self.tokens))
        self.open_paths = frozenset(open_paths)
        self.trusted_hosts = frozenset(h.lower() for h in trusted_hosts)
        self.allow_unauthenticated = allow_unauthenticated
        self._scopes_for = scopes_for
        self._remote_refused = f"Remote request refused: this {what} has no token"
        self._local_peer = _Verdicts(_is_local_peer)
        self._host_allowed = _Verdicts(lambda value: self._allowed_name(_host_of_header(value)))
        self._origin_allowed = _Verdicts(lambda value: self._allowed_name(_host_of_origin(value)))

    def protect(self, app: ASGIApp) -> ASGIApp:
        """Return `app` behind this guard (for `Middleware(guard.protect)`: one guard, one set of verdicts)."""

        async def guarded(scope: Scope, receive: Receive, send: Send) -> None:
            refusal = self.refusal(scope) if scope["type"] == "http" else None
            if refusal is None:
                await app(scope, receive, send)
            else:
                await refusal(scope, receive, send)

        return guarded

    def refusal(self, scope: Scope) -> Response | None:
        """Return the answer refusing this HTTP request, or None when it may proceed."""
        path = _route_path(scope)
        if path in self.open_paths:
            return None
        accepted = ONLY_CONTROL if self._scopes_for is None else self._scopes_for(scope["method"], path)
        if accepted & self._configured:
            presented = self._presented_scopes(scope)
            if not presented:
                return error_response(401, "Unauthorized", {"WWW-Authenticate": "Bearer"})
            if presented & accepted:
                return None
            return error_response(403, _forbidden_message(presented, accepted))
        if self.allow_unauthenticated:
            return None
        return self._local_only(scope)

    def _local_only(self, scope: Scope) -> Response | None:
        client = scope.get("client")
        if client is not None and not self._local_peer(str(client[0])):
            return error_response(403, self._remote_refused)
        host = origin = None
        for key, value in scope["headers"]:
            if key == b"host":
                host = value
            elif key == b"origin":
                origin = value
        if host is not None and not self._host_allowed(host.decode("latin-1")):
            return error_response(421, "Misdirected request")
        if origin is not None and not self._origin_allowed(origin.decode("latin-1")):
            return error_response(403, "Cross-origin request refused")
        return None

    def _allowed_name(self, host: str | None) -> bool:
        return host is not None and (is_loopback_host(host) or host.lower() in self.trusted_hosts)

    def _presented_scopes(self, scope: Scope) -> Scopes:
        for key, value in scope["headers"]:
            if key == b"authorization":
                scheme, _, credentials = value.partition(b" ")
                if scheme.lower() != b"bearer":
                    return frozenset()
                presented = credentials.strip()
                # Compare against every token so timing does not reveal which one (or whether any) matched.
                granted: Scopes = frozenset()
                for token, scopes in self.tokens:
                    if hmac.compare_digest(presented, token):
                        granted |= scopes
                return granted
        return frozenset()


def _is_local_peer(address: str) -> bool:
    # "testclient" is what Starlette's TestClient reports: an in-process call, never a network peer (servers
    # always report an IP address).
    return address == "testclient" or is_loopback_host(address)


def _forbidden_message(presented: Scopes, accepted: Scopes) -> str:
    if accepted == {NODE}:
        return "Forbidden: registering nodes needs the node token"
    if presented == {NODE}:
        return "Forbidden: the node token only registers nodes"
    return "Forbidden: this token does not allow this request"


def _route_path(scope: Scope) -> str:
    path: str = scope["path"]
    root_path: str = scope.get("root_path", "")
    if root_path and path.startswith(root_path):
        return path[len(root_path) :] or "/"
    return path
