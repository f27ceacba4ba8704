"""The node's HTTP API (SPEC section 3) as a Starlette app, and the lifespan that runs its runtime.

The runtime is known only through the Protocol in `_protocol` and the adapters in `_promptise_compat`;
nothing here knows which server runs the app or how nodes are discovered.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Literal

import anyio
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from . import _promptise_compat as compat
from ._http import (
    JSONResponse,
    RequestGuard,
    dumps,
    error_response,
    exception_handlers,
    normalize_tokens,
    parse_event_body,
    read_json_object,
    response_for_exception,
)
from ._metrics import build_registry, metrics_endpoint
from ._openapi import node_openapi
from ._protocol import ClosableRuntime, RuntimeLike

__all__ = ["create_transport_app", "node_lifespan"]

logger = logging.getLogger("promptise_asgi.transport")

DEFAULT_MAX_BODY_BYTES = 1024 * 1024

Phase = Literal["starting", "ready", "draining", "stopped"]


@dataclass(eq=False)
class _Node:
    runtime: RuntimeLike
    node_id: str
    max_body_bytes: int
    retry_after: int
    secured: bool
    phase: Phase = "starting"
    _health: tuple[int, dict[str, Any], dict[str, Any]] | None = None

    def health_messages(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """The ASGI messages answering `GET /health`, rebuilt only when the process count changes.

        Load balancers and orchestrators hit `/health` more than anything else; answering it from two
        prepared messages costs what a bare ASGI app costs.
        """
        count = len(self.runtime.processes)
        cached = self._health
        if cached is None or cached[0] != count:
            body = dumps({"status": "healthy", "node_id": self.node_id, "process_count": count})
            start = {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))],
            }
            cached = self._health = (count, start, {"type": "http.response.body", "body": body})
        return cached[1], cached[2]

    def process(self, name: str) -> Any:
        if name not in self.runtime.processes:
            raise HTTPException(404, f"Process '{name}' not found")
        return self.runtime.get_process(name)


def _node(request: Request) -> _Node:
    node: _Node = request.scope["app"].node
    return node


async def health(request: Request) -> Response:
    node = _node(request)
    return JSONResponse({"status": "healthy", "node_id": node.node_id, "process_count": len(node.runtime.processes)})


async def livez(request: Request) -> Response:
    return JSONResponse({"status": "alive"})


async def readyz(request: Request) -> Response:
    node = _node(request)
    if node.phase == "ready":
        return JSONResponse({"status": "ready", "node_id": node.node_id})
    return JSONResponse({"error": f"Node is not ready ({node.phase})", "status": node.phase}, status_code=503)


async def status(request: Request) -> Response:
    node = _node(request)
    body = {**node.runtime.status(), "node_id": node.node_id}
    # Set by whoever runs the node's self-registration (RuntimeTransport, the module app): trouble shows here.
    registration = getattr(request.scope["app"].state, "registration", None)
    if registration is not None:
        body["registration"] = registration.status()
    return JSONResponse(body)


async def list_processes(request: Request) -> Response:
    node = _node(request)
    processes = [
        {"name": name, "state": compat.state_name(process), "process_id": process.process_id}
        for name, process in node.runtime.processes.items()
    ]
    return JSONResponse({"node_id": node.node_id, "processes": processes})


async def process_status(request: Request) -> Response:
    return JSONResponse(_node(request).process(request.path_params["name"]).status())


async def start_process(request: Request) -> Response:
    node, name = _node(request), request.path_params["name"]
    node.process(name)
    changed = await _lifecycle("start", compat.start_process(node.runtime, name), name)
    return JSONResponse({"status": "started", "name": name, "changed": changed})


async def stop_process(request: Request) -> Response:
    node, name = _node(request), request.path_params["name"]
    node.process(name)
    changed = await _lifecycle("stop", compat.stop_process(node.runtime, name), name)
    return JSONResponse({"status": "stopped", "name": name, "changed": changed})


async def restart_process(request: Request) -> Response:
    node, name = _node(request), request.path_params["name"]
    node.process(name)
    await _lifecycle("restart", compat.restart_process(node.runtime, name), name)
    return JSONResponse({"status": "restarted", "name": name})


async def _lifecycle(action: str, operation: Any, name: str) -> Any:
    # A process that fails to start (a bad handler, a model it cannot build) is a server-side fault the
    # operator must see: answer 500 with the runtime's own message rather than a bare "Internal error".
    try:
        return await operation
    except Exception as exc:
        logger.warning("%s of process %r failed: %s", action, name, exc)
        raise HTTPException(500, f"Failed to {action} process '{name}': {exc}") from exc


async def inject_event(request: Request) -> Response:
    node, name = _node(request), request.path_params["name"]
    process = node.process(name)
    fields = parse_event_body(await read_json_object(request, node.max_body_bytes))
    event = compat.make_event(
        process,
        trigger_id=fields.trigger_id,
        trigger_type=fields.trigger_type,
        payload=fields.payload,
        metadata=fields.metadata,
    )
    try:
        await compat.inject(process, event)
    except Exception as exc:
        if compat.queue_full_retry_after(exc) is None:
            raise
        return error_response(429, str(exc), {"Retry-After": str(node.retry_after)})
    return JSONResponse({"status": "injected", "event_id": compat.event_id_of(event), "process": name}, status_code=202)


async def openapi(request: Request) -> Response:
    node = _node(request)
    return JSONResponse(node_openapi(request.scope.get("root_path", ""), secured=node.secured))


Endpoint = Callable[[Request], Awaitable[Response]]

# The API routes a hot path can reach without the generic routing stack: (method, path) and, for
# /processes/{name}/{action}, (method, action).
_STATIC: dict[tuple[str, str], Endpoint] = {
    ("GET", "/health"): health,
    ("GET", "/livez"): livez,
    ("GET", "/readyz"): readyz,
    ("GET", "/status"): status,
    ("GET", "/processes"): list_processes,
}
_PROCESS_ACTIONS: dict[tuple[str, str], Endpoint] = {
    ("GET", "status"): process_status,
    ("POST", "start"): start_process,
    ("POST", "stop"): stop_process,
    ("POST", "restart"): restart_process,
    ("POST", "event"): inject_event,
}


class TransportApp(Starlette):
    """The node app: a Starlette app whose API routes skip the generic middleware and routing stack.

    Every request goes through the same guard and the same endpoints; for the API routes (matched exactly
    by method and path) the app calls the endpoint directly instead of walking Starlette's middleware and
    route list, which costs several times what the endpoint itself does on `GET /health` or
    `POST /processes/{name}/event`. Everything else (HEAD, 404, 405, `/metrics`, `/openapi.json`, lifespan)
    takes the full Starlette path.
    """

    def __init__(self, *, node: _Node, guard: RequestGuard, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.node = node
        self.state.node = node
        self._guard = guard
        self._direct = True

    def add_middleware(self, middleware_class: Any, *args: Any, **kwargs: Any) -> None:
        # Middleware a user adds must see every request: from then on, every request takes the full stack.
        self._direct = False
        super().add_middleware(middleware_class, *args, **kwargs)

    def add_exception_handler(self, exc_class_or_status_code: Any, handler: Any) -> None:
        self._direct = False
        super().add_exception_handler(exc_class_or_status_code, handler)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        endpoint = _direct_endpoint(scope) if self._direct and scope["type"] == "http" else None
        if endpoint is None:
            await super().__call__(scope, receive, send)
            return
        scope["app"] = self
        refusal = self._guard.refusal(scope)
        if refusal is not None:
            await refusal(scope, receive, send)
            return
        if endpoint is health:
            start, body = self.node.health_messages()
            await send(start)
            await send(body)
            return
        try:
            response = await endpoint(Request(scope, receive, send))
        except ClientDisconnect:
            return  # nobody is left to answer
        except Exception as exc:
            if not isinstance(exc, HTTPException):
                logger.exception("%s %s failed", scope["method"], scope["path"])
            response = response_for_exception(exc)
        await response(scope, receive, send)


def _direct_endpoint(scope: Scope) -> Endpoint | None:
    path: str = scope["path"]
    root_path: str = scope.get("root_path", "")
    if root_path:
        if not path.startswith(root_path):
            return None
        path = path[len(root_path) :]
    method: str = scope["method"]
    endpoint = _STATIC.get((method, path))
    if endpoint is not None or not path.startswith("/processes/"):
        return endpoint
    name, _, action = path[len("/processes/") :].rpartition("/")
    endpoint = _PROCESS_ACTIONS.get((method, action))
    if endpoint is None or not name or "/" in name:
        return None
    scope["path_params"] = {"name": name}
    return endpoint


def create_transport_app(
    runtime: RuntimeLike,
    node_id: str = "node-1",
    *,
    auth_token: str | Sequence[str] | None = None,
    allow_unauthenticated: bool = False,
    trusted_hosts: Sequence[str] = (),
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    retry_after: int = 1,
    manage_runtime: bool = False,
) -> Starlette:
    """Build the node's HTTP API (SPEC section 3) over `runtime`.

    Args:
        runtime: the built-in `AgentRuntime`, a `promptise` `AgentRuntime`, or anything with that shape.
        node_id: the id this node reports.
        auth_token: a bearer token, or several (rotation). Every route but `/health`, `/livez` and `/readyz`
            then needs `Authorization: Bearer <token>`.
        allow_unauthenticated: with no token, serve any peer: skip the guard that otherwise refuses a
            non-loopback client (403), `Host` (421) and `Origin` (403). For a node behind an authenticating
            proxy or on a private network. Off by default.
        trusted_hosts: `Host`/`Origin` names accepted besides loopback when there is no token (the name a
            local reverse proxy forwards); they do not admit remote peers.
        max_body_bytes: the largest event body accepted (413 past it, refused while streaming).
        retry_after: seconds sent in `Retry-After` when a process queue is full.
        manage_runtime: start the runtime when the app's lifespan starts and stop it at shutdown. Leave it
            off when mounting (mounted apps get no lifespan events) and use `node_lifespan` instead.

    Returns:
        A Starlette app; `app.state.node_id` and `app.state.runtime` expose what it serves.

    Raises:
        ValueError: a blank token, or a non-positive `max_body_bytes`.
    """
    tokens = normalize_tokens(auth_token)
    if max_body_bytes < 1:
        raise ValueError("max_body_bytes must be a positive number of bytes")
    routes = [
        Route("/health", health, methods=["GET"]),
        Route("/livez", livez, methods=["GET"]),
        Route("/readyz", readyz, methods=["GET"]),
        Route("/status", status, methods=["GET"]),
        Route("/processes", list_processes, methods=["GET"]),
        Route("/processes/{name}/status", process_status, methods=["GET"]),
        Route("/processes/{name}/start", start_process, methods=["POST"]),
        Route("/processes/{name}/stop", stop_process, methods=["POST"]),
        Route("/processes/{name}/restart", restart_process, methods=["POST"]),
        Route("/processes/{name}/event", inject_event, methods=["POST"]),
        Route("/metrics", metrics_endpoint, methods=["GET"]),
        Route("/openapi.json", openapi, methods=["GET"]),
    ]
    guard = RequestGuard(tokens=tokens, trusted_hosts=trusted_hosts, allow_unauthenticated=allow_unauthenticated)
    app = TransportApp(
        node=_Node(runtime, node_id, max_body_bytes, retry_after, secured=bool(tokens)),
        guard=guard,
        routes=routes,
        middleware=[Middleware(guard.protect)],
        exception_handlers=exception_handlers(),
        lifespan=node_lifespan if manage_runtime else None,
    )
    # A trailing-slash redirect would point outside the mount under some proxies; an exact 404 is clearer.
    app.router.redirect_slashes = False
    app.state.node_id = node_id
    app.state.runtime = runtime
    app.state.metrics_registry = build_registry(node_id, runtime)
    return app


@asynccontextmanager
async def node_lifespan(app: Starlette) -> AsyncIterator[None]:
    """Start the runtime behind a transport app, and drain and stop it on exit.

    The end of the node's lifespan is the runtime's exit: a runtime with an `aclose()` (the built-in one) is
    closed, so events still queued in a memory store are discarded with a log line saying how many.
    `/readyz` answers 503 before this starts, 200 inside it, and 503 again while draining and after.
    Use it in a host app's own lifespan when the transport app is mounted::

        node = create_transport_app(runtime, node_id="node-1")

        @asynccontextmanager
        async def lifespan(app):
            async with node_lifespan(node):
                yield

    Args:
        app: an app built by `create_transport_app`.
    """
    node: _Node = app.state.node
    node.phase = "starting"
    try:
        await node.runtime.start_all()
    except BaseException:
        # start_all starts what it can before raising: stop those too, so a failed start leaves nothing running.
        node.phase = "stopped"
        with anyio.CancelScope(shield=True):
            await node.runtime.stop_all()
        raise
    node.phase = "ready"
    try:
        yield
    finally:
        node.phase = "draining"
        try:
            runtime = node.runtime
            await (runtime.aclose() if isinstance(runtime, ClosableRuntime) else runtime.stop_all())
        finally:
            node.phase = "stopped"
