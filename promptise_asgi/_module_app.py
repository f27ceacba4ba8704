"""`promptise_asgi.app`: the node that `uvicorn promptise_asgi:app` and `hypercorn promptise_asgi:app` serve.

It is a real module attribute (servers look it up in the module namespace), built from the environment
when the server's lifespan starts: `PROMPTISE_CONFIG` or `./promptise.toml` or the built-in demo, plus
`PROMPTISE_NODE_ID`, `PROMPTISE_AUTH_TOKEN`, `PROMPTISE_COORDINATOR_URL`, `PROMPTISE_ADVERTISE_URL`,
`PROMPTISE_ALLOW_UNAUTHENTICATED`, `PROMPTISE_TRUSTED_HOSTS` and `PROMPTISE_STORE` (by default the node keeps
its events in `./promptise-data/<node_id>.sqlite3`). A bad config is reported as
`lifespan.startup.failed`, so the server exits instead of serving a broken node. The app cannot see the
address the server bound, so without a token it serves loopback peers only, whatever `--host` says.
"""

from __future__ import annotations

import functools
import logging
from contextlib import AsyncExitStack
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the web stack loads when the server starts the app, not when the package is imported
    from starlette.types import ASGIApp, Receive, Scope, Send

    from .config import NodeSettings

__all__ = ["NodeApp", "app"]

logger = logging.getLogger("promptise_asgi")


class NodeApp:
    """An ASGI app that builds and runs a node from the environment during the server's lifespan.

    Args:
        overrides: settings that win over the environment and the file (used by the command line).
    """

    def __init__(self, overrides: dict[str, Any] | None = None) -> None:
        self.overrides = overrides or {}
        self.settings: NodeSettings | None = None
        self._app: ASGIApp | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
        elif self._app is not None:
            await self._app(scope, receive, send)
        elif scope["type"] == "http":
            body = b'{"error":"Node not started: the server must run the ASGI lifespan (e.g. uvicorn --lifespan on)"}'
            headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
            await send({"type": "http.response.start", "status": 503, "headers": headers})
            await send({"type": "http.response.body", "body": body})

    async def _start(self, stack: AsyncExitStack) -> tuple[NodeSettings, ASGIApp]:
        from .config import resolve_settings
        from .transport import create_transport_app, node_lifespan
        from .transport._registration import registration_for, runtime_digest

        settings = resolve_settings(overrides=self.overrides)
        registration = registration_for(settings)
        runtime = await settings.build_runtime()
        # Outside the ready line too: a second worker on the same store fails before it, naming the file.
        logger.info("node %s keeps accepted events in %s", settings.node_id, runtime.store.location)
        app = create_transport_app(
            runtime,
            settings.node_id,
            auth_token=settings.auth_token,
            read_token=settings.read_token,
            allow_unauthenticated=settings.allow_unauthenticated,
            trusted_hosts=settings.trusted_hosts,
            max_body_bytes=settings.max_body_bytes,
        )
        await stack.enter_async_context(node_lifespan(app))
        if registration is not None:
            app.state.node.registration = registration  # the node's GET /status shows it
            registration.digest = functools.partial(runtime_digest, runtime)  # heartbeats say what runs
            await registration.start()
            stack.push_async_callback(registration.stop)
        return settings, app

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        await receive()  # lifespan.startup
        stack = AsyncExitStack()
        failure: str | None = None
        try:
            settings, app = await self._start(stack)
        except Exception as exc:
            await stack.aclose()
            failure = str(exc)
        if failure is not None:
            # Sent outside the except block: some servers raise from send() and would chain our error to theirs.
            # The server prints the message itself.
            await send({"type": "lifespan.startup.failed", "message": failure})
            return
        self.settings, self._app = settings, app
        logger.info("node %s ready (%d processes, from %s)", settings.node_id, len(settings.processes), settings.source)
        _log_exposure(settings)
        await send({"type": "lifespan.startup.complete"})
        await receive()  # lifespan.shutdown
        try:
            await stack.aclose()
        except Exception as exc:
            await send({"type": "lifespan.shutdown.failed", "message": str(exc)})
        else:
            await send({"type": "lifespan.shutdown.complete"})


app = NodeApp()


def _log_exposure(settings: NodeSettings) -> None:
    if settings.auth_token is not None:
        return
    if settings.allow_unauthenticated:
        logger.warning(
            "node %s has no token and PROMPTISE_ALLOW_UNAUTHENTICATED is set: anyone who can reach this server "
            "can start, stop and drive its processes; set PROMPTISE_AUTH_TOKEN unless a proxy or a private "
            "network protects the port",
            settings.node_id,
        )
    else:
        logger.info(
            "node %s has no token (PROMPTISE_AUTH_TOKEN): its API answers loopback clients only; "
            "requests from other machines get 403",
            settings.node_id,
        )
