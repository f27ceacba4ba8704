"""`RequestGuard`: who may call which route of a node or coordinator app.

Bearer tokens and the scopes they grant; without a token, loopback peers only (and loopback `Host`/`Origin`).
Knows Starlette's ASGI types, nothing of the routes behind it.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable, Collection, Iterable, Mapping

from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from .._validation import is_loopback_host
from ._responses import error_response

__all__ = [
    "CONTROL",
    "NODE",
    "ONLY_CONTROL",
    "PROBE_PATHS",
    "READ",
    "RequestGuard",
    "ScopeRule",
    "Scopes",
    "route_path",
    "scoped_tokens",
    "token_fingerprint",
]

PROBE_PATHS = ("/health", "/livez", "/readyz")

# What a token may do. A token maps to one or more scopes; a route accepts some of them.
CONTROL = "control"  # the operator's token: every route of the app
NODE = "node"  # the token a coordinator shares with its nodes: registering, heartbeating, unregistering
READ = "read"  # a read-only token: GET routes and streams only
Scopes = frozenset[str]
ONLY_CONTROL: Scopes = frozenset({CONTROL})
_READ: Scopes = frozenset({READ})
_SAFE_METHODS = frozenset({"GET", "HEAD"})
ScopeRule = Callable[[str, str], Scopes]

# Longest Host/Origin/peer value whose verdict is remembered: a guard must not be a place to park memory.
_MAX_CACHED_VALUE = 256
_MAX_CACHED_VERDICTS = 1024


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
      route accepts; by default every route accepts the `control` scope, which every plain token has, and
      GET routes and streams also the `read` scope of a read-only token).
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
        self.has_tokens = bool(self.tokens)
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
        path = route_path(scope)
        if path in self.open_paths:
            return None
        method = scope["method"]
        accepted = ONLY_CONTROL if self._scopes_for is None else self._scopes_for(method, path)
        if method in _SAFE_METHODS:
            accepted = accepted | _READ
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
        presented = _bearer(scope)
        if presented is None:
            return frozenset()
        # Compare against every token so timing does not reveal which one (or whether any) matched.
        granted: Scopes = frozenset()
        for token, scopes in self.tokens:
            if hmac.compare_digest(presented, token):
                granted |= scopes
        return granted

    def classify(self, scope: Scope) -> tuple[str, str | None]:
        """For the audit log: the request's scope (`control`, `node`, `read` or `open`) and the fingerprint of
        the token it presented (None without one); never the token."""
        presented = _bearer(scope)
        if presented is None:
            return "open", None
        granted = self._presented_scopes(scope)
        kind = next((name for name in (CONTROL, NODE, READ) if name in granted), "open")
        return kind, token_fingerprint(presented)


def _bearer(scope: Scope) -> bytes | None:
    for key, value in scope["headers"]:
        if key == b"authorization":
            scheme, _, credentials = value.partition(b" ")
            return credentials.strip() if scheme.lower() == b"bearer" else None
    return None


def token_fingerprint(token: bytes) -> str:
    """The first 8 hex characters of a token's SHA-256: enough to tell tokens apart in a log, never the token."""
    return hashlib.sha256(token).hexdigest()[:8]


def _is_local_peer(address: str) -> bool:
    # "testclient" is what Starlette's TestClient reports: an in-process call, never a network peer (servers
    # always report an IP address).
    return address == "testclient" or is_loopback_host(address)


def _forbidden_message(presented: Scopes, accepted: Scopes) -> str:
    if presented == _READ:
        return "Forbidden: read-only token"
    if accepted == {NODE}:
        return "Forbidden: registering nodes needs the node token"
    if presented == {NODE}:
        return "Forbidden: the node token only registers nodes"
    return "Forbidden: this token does not allow this request"


def route_path(scope: Scope) -> str:
    """The request's path below the app's mount point (`root_path`)."""
    path: str = scope["path"]
    root_path: str = scope.get("root_path", "")
    if root_path and path.startswith(root_path):
        return path[len(root_path) :] or "/"
    return path


def scoped_tokens(control: Iterable[bytes], read: Iterable[bytes] = ()) -> dict[bytes, Scopes]:
    """The token -> scopes map of an app with control tokens and read-only tokens (a token in both has both).

    Raises:
        ValueError: read-only tokens without a control token (the writes would be left to the loopback rule).
    """
    control, read = tuple(control), tuple(read)
    if read and not control:
        raise ValueError("read_token needs auth_token: without it, writes would be open to this machine")
    granted: dict[bytes, Scopes] = {token: ONLY_CONTROL for token in control}
    for token in read:
        granted[token] = granted.get(token, frozenset()) | _READ
    return granted
