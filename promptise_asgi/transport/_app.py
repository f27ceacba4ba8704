"""`create_transport_app`: the node's HTTP API as a Starlette app, and `node_lifespan`, which runs its runtime.

Nothing here knows which server runs the app or how nodes are discovered.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager

import anyio
from starlette.applications import Starlette
from starlette.middleware import Middleware

from .._http import DEFAULT_PING_INTERVAL, RequestGuard, exception_handlers, scoped_tokens
from .._validation import check_count, check_seconds, normalize_tokens
from ._endpoints import NodeState, api_routes
from ._fastpath import TransportApp
from ._metrics import build_registry
from ._shape import ClosableRuntime, RuntimeLike

__all__ = ["DEFAULT_MAX_BODY_BYTES", "create_transport_app", "node_lifespan"]

DEFAULT_MAX_BODY_BYTES = 1024 * 1024


def create_transport_app(
    runtime: RuntimeLike,
    node_id: str = "node-1",
    *,
    auth_token: str | Sequence[str] | None = None,
    read_token: str | Sequence[str] | None = None,
    allow_unauthenticated: bool = False,
    trusted_hosts: Sequence[str] = (),
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    retry_after: int = 1,
    manage_runtime: bool = False,
    ping_interval: float = DEFAULT_PING_INTERVAL,
) -> Starlette:
    """Build the node's HTTP API (SPEC section 3) over `runtime`.

    Args:
        runtime: the built-in `AgentRuntime`, a `promptise` `AgentRuntime`, or anything with that shape.
        node_id: the id this node reports.
        auth_token: a bearer token, or several (rotation). Every route but `/health`, `/livez` and `/readyz`
            then needs `Authorization: Bearer <token>`.
        read_token: a read-only token, or several: GET routes and the change stream only; any other method
            with it is 403. Needs `auth_token`.
        allow_unauthenticated: with no token, serve any peer: skip the guard that otherwise refuses a
            non-loopback client (403), `Host` (421) and `Origin` (403). For a node behind an authenticating
            proxy or on a private network. Off by default.
        trusted_hosts: `Host`/`Origin` names accepted besides loopback when there is no token (the name a
            local reverse proxy forwards); they do not admit remote peers.
        max_body_bytes: the largest event body accepted (413 past it, refused while streaming).
        retry_after: seconds sent in `Retry-After` when a process queue is full.
        ping_interval: seconds between the `: ping` comments that keep a quiet `/changes` stream open
            through proxies.
        manage_runtime: start the runtime when the app's lifespan starts and stop it at shutdown. Leave it
            off when mounting (mounted apps get no lifespan events) and use `node_lifespan` instead.

    Returns:
        A Starlette app; `app.state.node_id` and `app.state.runtime` expose what it serves.

    Raises:
        ValueError: a blank token, or a non-positive `max_body_bytes`.
    """
    tokens = normalize_tokens(auth_token)
    check_count("max_body_bytes", max_body_bytes)
    guard = RequestGuard(
        tokens=scoped_tokens(tokens, normalize_tokens(read_token, "read_token")),
        trusted_hosts=trusted_hosts,
        allow_unauthenticated=allow_unauthenticated,
    )
    app = TransportApp(
        node=NodeState(
            runtime,
            node_id,
            max_body_bytes,
            retry_after,
            secured=bool(tokens),
            ping_interval=check_seconds("ping_interval", ping_interval),
        ),
        guard=guard,
        routes=api_routes(),
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
    node: NodeState = app.state.node
    node.set_phase("starting")
    try:
        await node.runtime.start_all()
    except BaseException:
        # start_all starts what it can before raising: stop those too, so a failed start leaves nothing running.
        node.set_phase("stopped")
        with anyio.CancelScope(shield=True):
            await node.runtime.stop_all()
        raise
    await node.changes.start()
    node.set_phase("ready")
    try:
        yield
    finally:
        node.set_phase("draining")
        try:
            runtime = node.runtime
            await (runtime.aclose() if isinstance(runtime, ClosableRuntime) else runtime.stop_all())
        finally:
            node.set_phase("stopped")
            await node.changes.stop()
