"""`create_coordinator_app`: the coordinator's HTTP API (SPEC 8.2), a registry nodes join over HTTP.

Node errors are passed through with their status, an unreachable node is 502 and a silent one 504; the
auth and error conventions are the node's (`.._http`). Knows the coordinator's public methods only.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any
from urllib.parse import quote

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from .._errors import MetadataTooLargeError
from .._http import (
    DEFAULT_PING_INTERVAL,
    NODE,
    ONLY_CONTROL,
    PROBE_PATHS,
    JSONResponse,
    RequestGuard,
    RequestLog,
    Scopes,
    event_stream,
    exception_handlers,
    parse_event_body,
    read_json_object,
    scoped_tokens,
)
from .._validation import check_idempotency_key, normalize_tokens
from ._core import RuntimeCoordinator
from ._digest import parse_digest
from ._table import check_page
from ._ui import UI_PATHS, ui_routes

__all__ = ["create_coordinator_app"]


def _coordinator(request: Request) -> RuntimeCoordinator:
    coordinator: RuntimeCoordinator = request.app.state.coordinator
    return coordinator


def _known_node(request: Request) -> str:
    node_id: str = request.path_params["node_id"]
    if node_id not in _coordinator(request).nodes:
        raise HTTPException(404, f"Node '{node_id}' not registered")
    return node_id


async def health(request: Request) -> Response:
    coordinator = _coordinator(request)
    return JSONResponse({"status": "healthy", "role": "coordinator", "node_count": len(coordinator.nodes)})


async def livez(request: Request) -> Response:
    return JSONResponse({"status": "alive"})


async def access(request: Request) -> Response:
    """What the caller may do: `control`, `read` (no control buttons) or `node`; the dashboard asks at sign-in."""
    guard: RequestGuard = request.app.state.guard
    kind = guard.classify(request.scope)[0] if guard.has_tokens else "control"
    return JSONResponse({"scope": kind})


async def changes(request: Request) -> Response:
    return event_stream(_coordinator(request).change_hub, request, ping_interval=request.app.state.ping_interval)


async def node_status(request: Request) -> Response:
    node_id = _known_node(request)
    return JSONResponse(await _coordinator(request).node_request(node_id, "GET", "/status"))


async def node_dead_letters(request: Request) -> Response:
    node_id = _known_node(request)
    path = f"/processes/{quote(request.path_params['name'], safe='')}/dead-letters"
    if request.url.query:
        path += f"?{request.url.query}"
    return JSONResponse(await _coordinator(request).node_request(node_id, "GET", path))


def _page_request(request: Request, default_limit: int | None) -> tuple[int | None, str | None, str | None, str | None]:
    """`limit`, `after`, `health` and `q` from the query string, checked (400 naming the one that is wrong)."""
    params = request.query_params
    try:
        return check_page(
            params.get("limit"), params.get("after"), params.get("health"), params.get("q"), default=default_limit
        )
    except ValueError as exc:
        raise HTTPException(400, str(exc)) from None


async def cluster_status(request: Request) -> Response:
    limit, after, _, _ = _page_request(request, None)
    return JSONResponse(await _coordinator(request).cluster_status(limit=limit, after=after))


async def nodes(request: Request) -> Response:
    return await (register_node(request) if request.method == "POST" else list_nodes(request))


async def list_nodes(request: Request) -> Response:
    limit, after, health, query = _page_request(request, 100)
    assert limit is not None  # a default was given
    return JSONResponse(await _coordinator(request).node_page(limit=limit, after=after, health=health, q=query))


async def register_node(request: Request) -> Response:
    body = await read_json_object(request, request.app.state.max_body_bytes)
    node_id: Any = body.get("node_id")  # of any JSON type: accept_registration checks them
    url: Any = body.get("url")
    try:
        answer = await _coordinator(request).accept_registration(node_id, url, body.get("metadata"))
    except MetadataTooLargeError as exc:
        raise HTTPException(413, str(exc)) from None
    except ValueError as exc:
        raise HTTPException(422, str(exc)) from None
    return JSONResponse(answer)


async def heartbeat(request: Request) -> Response:
    node_id: str = request.path_params["node_id"]
    coordinator = _coordinator(request)
    body = await read_json_object(request, coordinator.max_digest_bytes, allow_empty=True)
    try:
        digest = parse_digest(body)
    except ValueError as exc:
        raise HTTPException(422, str(exc)) from None
    if not await coordinator.accept_heartbeat(node_id, digest):
        raise HTTPException(404, f"Node '{node_id}' not registered")
    return JSONResponse({"status": "ok", "node_id": node_id})


async def unregister_node(request: Request) -> Response:
    node_id: str = request.path_params["node_id"]
    if not await _coordinator(request).accept_unregistration(node_id):
        raise HTTPException(404, f"Node '{node_id}' not registered")
    return JSONResponse({"status": "unregistered", "node_id": node_id})


async def start_on_node(request: Request) -> Response:
    node_id = _known_node(request)
    return JSONResponse(await _coordinator(request).start_process_on_node(node_id, request.path_params["name"]))


async def stop_on_node(request: Request) -> Response:
    node_id = _known_node(request)
    return JSONResponse(await _coordinator(request).stop_process_on_node(node_id, request.path_params["name"]))


async def restart_on_node(request: Request) -> Response:
    node_id = _known_node(request)
    return JSONResponse(await _coordinator(request).restart_process_on_node(node_id, request.path_params["name"]))


async def event_on_node(request: Request) -> Response:
    node_id = _known_node(request)
    fields = parse_event_body(await read_json_object(request, request.app.state.max_body_bytes))
    result = await _coordinator(request).inject_event_on_node(
        node_id,
        request.path_params["name"],
        fields.payload,
        trigger_id=fields.trigger_id,
        trigger_type=fields.trigger_type,
        metadata=fields.metadata,
        idempotency_key=_idempotency_key(request),
    )
    return JSONResponse(result, status_code=202)


async def broadcast(request: Request) -> Response:
    body = await read_json_object(request, request.app.state.max_body_bytes)
    fields = parse_event_body(body)
    node_ids = body.get("node_ids")
    if node_ids is not None and (not isinstance(node_ids, list) or not all(isinstance(n, str) for n in node_ids)):
        raise HTTPException(400, "node_ids must be a list of node ids")
    process: str = request.path_params["name"]
    results = await _coordinator(request).broadcast_event(
        process,
        fields.payload,
        node_ids=node_ids,
        trigger_type=fields.trigger_type,
        metadata=fields.metadata,
        idempotency_key=_idempotency_key(request),
    )
    return JSONResponse({"process": process, "results": results})


def _idempotency_key(request: Request) -> str | None:
    """The request's `Idempotency-Key`, passed on to the nodes (400 here rather than at every node)."""
    key = request.headers.get("idempotency-key")
    if key is None:
        return None
    try:
        return check_idempotency_key(key)
    except ValueError as exc:
        raise HTTPException(400, str(exc)) from None


def _scope_rule(node_token_set: bool) -> Callable[[str, str], Scopes]:
    """Registering, heartbeating and unregistering are a node's acts: with a node token set, only it may."""
    registration: Scopes = frozenset({NODE}) if node_token_set else ONLY_CONTROL

    def scopes_for(method: str, path: str) -> Scopes:
        if method == "POST" and (path == "/cluster/nodes" or path.endswith("/heartbeat")):
            return registration
        if method == "DELETE" and path.startswith("/cluster/nodes/"):
            return registration
        return ONLY_CONTROL

    return scopes_for


def create_coordinator_app(
    coordinator: RuntimeCoordinator,
    *,
    auth_token: str | Sequence[str] | None = None,
    read_token: str | Sequence[str] | None = None,
    allow_unauthenticated: bool = False,
    trusted_hosts: Sequence[str] = (),
    max_body_bytes: int = 1024 * 1024,
    ping_interval: float = DEFAULT_PING_INTERVAL,
) -> Starlette:
    """Serve a coordinator over HTTP (SPEC 8.2).

    Routes are protected like a node's: `/health`, `/livez` and `/readyz` are open, everything else needs
    the bearer token when one is set, and without a token only loopback peers are served. Registering,
    heartbeating and unregistering (`POST /cluster/nodes`, `POST /cluster/nodes/{id}/heartbeat`,
    `DELETE /cluster/nodes/{id}`) are a node's acts: when the coordinator has a node token
    (`RuntimeCoordinator(auth_token=...)`, the token it sends to nodes), they need that token and no other,
    so an operator token cannot make the coordinator send the node token anywhere.
    The app does not run the coordinator's health monitor: enter `async with coordinator:` in the host's
    lifespan (or use `promptise-asgi coordinator`).

    Args:
        coordinator: the coordinator to serve.
        auth_token: the operator's token (or tokens) for every other route.
        read_token: a read-only token (or tokens): GET routes and streams only, 403 on anything else.
        allow_unauthenticated: with no token, serve any peer (drop the loopback guard).
        trusted_hosts: `Host`/`Origin` names accepted besides loopback by that guard.
        max_body_bytes: the largest request body accepted.
        ping_interval: seconds between the `: ping` comments of a quiet `/cluster/changes` stream.

    Raises:
        ValueError: a blank token.
    """
    tokens = scoped_tokens(normalize_tokens(auth_token), normalize_tokens(read_token, "read_token"))
    node_token = coordinator.node_token
    if node_token is not None:
        key = node_token.encode()
        tokens[key] = tokens.get(key, frozenset()) | {NODE}
    routes = [
        *ui_routes(),
        Route("/health", health, methods=["GET"]),
        Route("/livez", livez, methods=["GET"]),
        Route("/readyz", livez, methods=["GET"]),
        Route("/cluster/status", cluster_status, methods=["GET"]),
        Route("/cluster/access", access, methods=["GET"]),
        Route("/cluster/changes", changes, methods=["GET"]),
        Route("/cluster/nodes/{node_id}/status", node_status, methods=["GET"]),
        Route("/cluster/nodes/{node_id}/processes/{name}/dead-letters", node_dead_letters, methods=["GET"]),
        Route("/cluster/nodes", nodes, methods=["GET", "POST"]),
        Route("/cluster/nodes/{node_id}", unregister_node, methods=["DELETE"]),
        Route("/cluster/nodes/{node_id}/heartbeat", heartbeat, methods=["POST"]),
        Route("/cluster/nodes/{node_id}/processes/{name}/start", start_on_node, methods=["POST"]),
        Route("/cluster/nodes/{node_id}/processes/{name}/stop", stop_on_node, methods=["POST"]),
        Route("/cluster/nodes/{node_id}/processes/{name}/restart", restart_on_node, methods=["POST"]),
        Route("/cluster/nodes/{node_id}/processes/{name}/event", event_on_node, methods=["POST"]),
        Route("/cluster/processes/{name}/event", broadcast, methods=["POST"]),
    ]
    guard = RequestGuard(
        tokens=tokens,
        trusted_hosts=trusted_hosts,
        allow_unauthenticated=allow_unauthenticated,
        scopes_for=_scope_rule(node_token is not None),
        what="coordinator",
        open_paths=(*PROBE_PATHS, *UI_PATHS),
    )
    middleware = [Middleware(RequestLog(guard).wrap), Middleware(guard.protect)]
    app = Starlette(routes=routes, middleware=middleware, exception_handlers=exception_handlers())
    app.router.redirect_slashes = False
    app.state.coordinator = coordinator
    app.state.guard = guard
    app.state.ping_interval = ping_interval
    app.state.max_body_bytes = max_body_bytes
    return app
