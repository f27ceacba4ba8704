"""`RuntimeTransport`: one runtime's node app, served in-process by an `AppServer`, optionally self-registered.

Knows the node app, the server driver and the registration loop; not the HTTP API's details.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from contextlib import AsyncExitStack
from types import TracebackType
from typing import Any

import anyio

from .._server import AppServer, ServerName
from .._validation import exposed_without_token, normalize_tokens
from ..discovery import ProcessDiscovery
from ._app import create_transport_app, node_lifespan
from ._registration import SelfRegistration, registration_url, runtime_digest
from ._shape import RuntimeLike

__all__ = ["RuntimeTransport"]

logger = logging.getLogger("promptise_asgi.transport")


class RuntimeTransport:
    """Serve a runtime's node API on a socket, in the current event loop.

    Example::

        async with RuntimeTransport(runtime, port=9100, node_id="node-1"):
            ...  # the node answers on http://127.0.0.1:9100

    Args:
        runtime: the runtime to serve (started by `start()`, stopped by `stop()`).
        host: interface to bind. A non-loopback host needs `auth_token` or `allow_unauthenticated=True`.
        port: TCP port; 0 picks a free one (read it back from `.port` after `start()`).
        node_id: the id this node reports (and registers under, with `discovery`).
        auth_token: bearer token(s) required on every route but the probes.
        allow_unauthenticated: permit a non-loopback bind with no token, and drop the loopback guard.
        server: "uvicorn" (default on asyncio) or "hypercorn" (default, and the only choice, on trio).
        ssl_certfile: TLS certificate file passed to the server.
        ssl_keyfile: TLS key file passed to the server.
        discovery: a `ProcessDiscovery` to register this node with while it runs.
        advertise_url: the URL other machines reach this node at (default: `.url`; bound to a wildcard address
            with a registry on another machine, one under this machine's hostname, never loopback).
        heartbeat_interval: seconds between heartbeats (default: the backend's ttl / 3, else 10).
        graceful_timeout: seconds `stop()` lets in-flight requests finish.
        log_level: the server's log level.
        limit_concurrency: connections served at once (uvicorn) or requests in flight (hypercorn); beyond it
            a request is answered 503.
        max_header_bytes: the largest request head (request line and header fields) accepted; a larger one is
            answered 431 (or 400) and its connection closed.
        read_timeout: seconds a client has to send a complete request head (from connecting, or from the first
            byte of a request after the previous response), and the longest it may pause in the middle of a
            request body; a connection past either is closed (hypercorn answers a stalled body 408 first).
        **app_options: passed to `create_transport_app` (`max_body_bytes`, `trusted_hosts`, ...).

    Raises:
        ValueError: a blank token, an unknown server, a non-loopback host without a token, or a limit that is
            not a positive number.
    """

    def __init__(
        self,
        runtime: RuntimeLike,
        host: str = "127.0.0.1",
        port: int = 9100,
        node_id: str = "node-1",
        *,
        auth_token: str | Sequence[str] | None = None,
        allow_unauthenticated: bool = False,
        server: ServerName | None = None,
        ssl_certfile: str | None = None,
        ssl_keyfile: str | None = None,
        discovery: ProcessDiscovery | None = None,
        advertise_url: str | None = None,
        heartbeat_interval: float | None = None,
        graceful_timeout: float = 5.0,
        log_level: str = "warning",
        limit_concurrency: int = 2048,
        max_header_bytes: int = 64 * 1024,
        read_timeout: float = 10.0,
        **app_options: Any,
    ) -> None:
        tokens = normalize_tokens(auth_token)
        if exposed_without_token(host, has_token=bool(tokens), allow_unauthenticated=allow_unauthenticated):
            raise ValueError(
                f"RuntimeTransport {node_id}: refusing to bind {host!r} without auth_token: anyone who can "
                "reach the port could start, stop and drive this runtime's agents. Pass auth_token=..., "
                "bind 127.0.0.1, or set allow_unauthenticated=True if an authenticating proxy or private "
                "network protects the port."
            )
        self.runtime = runtime
        self.host = host
        self.node_id = node_id
        self.discovery = discovery
        self.advertise_url = advertise_url
        self.heartbeat_interval = heartbeat_interval
        self.app = create_transport_app(
            runtime,
            node_id,
            auth_token=auth_token,
            allow_unauthenticated=allow_unauthenticated,
            **app_options,
        )
        self._server = AppServer(
            self.app,
            host,
            port,
            server=server,
            ssl_certfile=ssl_certfile,
            ssl_keyfile=ssl_keyfile,
            graceful_timeout=graceful_timeout,
            log_level=log_level,
            name=f"node {node_id}",
            limit_concurrency=limit_concurrency,
            max_header_bytes=max_header_bytes,
            read_timeout=read_timeout,
        )
        self._stack: AsyncExitStack | None = None

    @property
    def port(self) -> int:
        """The bound port while running; the requested port otherwise."""
        return self._server.port

    @property
    def url(self) -> str:
        """The base URL of this node (loopback form when bound to a wildcard address)."""
        return self._server.url

    @property
    def running(self) -> bool:
        """True between a successful `start()` and `stop()`."""
        return self._stack is not None

    def __repr__(self) -> str:
        return f"RuntimeTransport(node={self.node_id!r}, url={self.url!r}, running={self.running})"

    async def start(self) -> None:
        """Bind, start the runtime, start the server, and return once it accepts requests.

        With `discovery`, the node registers in the background from then on: start() never waits on the
        registry (its progress shows in `GET /status` under `"registration"`).

        Raises:
            OSError: the address could not be bound (for example, the port is in use).
            RuntimeError: already running, the server failed to start, or uvicorn was asked for under trio.
        """
        if self._stack is not None:
            raise RuntimeError(f"{self!r} is already running")
        self._server.check_backend()
        self._server.bind()  # before the runtime starts: a port in use must leave nothing running
        stack = AsyncExitStack()
        try:
            stack.callback(self._server.close)
            registration = await self._registration()
            await stack.enter_async_context(node_lifespan(self.app))
            await self._server.start()
            stack.push_async_callback(self._server.stop)
            if registration is not None:
                # In the background: a dead or silent registry never delays the node's start.
                await registration.start()
                stack.push_async_callback(registration.stop)
        except BaseException:
            # Also when cancelled (Ctrl-C while starting): what started must stop, which a cancelled scope would
            # cut short.
            with anyio.CancelScope(shield=True):
                await stack.aclose()
            raise
        self._stack = stack
        logger.info("node %s serving on %s", self.node_id, self.url)

    async def _registration(self) -> SelfRegistration | None:
        if self.discovery is None:
            return None
        url = self.advertise_url or await registration_url(self.url, self.host, self.discovery, self.node_id)
        registration = SelfRegistration(
            self.discovery,
            self.node_id,
            url,
            interval=self.heartbeat_interval,
            digest=functools.partial(runtime_digest, self.runtime),
        )
        self.app.state.node.registration = registration  # the node's GET /status shows it
        return registration

    @property
    def advertised_url(self) -> str | None:
        """The URL this node registers under, once started with `discovery` (None otherwise)."""
        registration = self.app.state.node.registration
        return None if registration is None else str(registration.url)

    async def stop(self) -> None:
        """Unregister, stop accepting, let in-flight requests finish, then drain and stop the runtime."""
        stack, self._stack = self._stack, None
        if stack is not None:
            node = self.app.state.node
            node.set_phase("draining")
            # Open change streams would keep the server waiting for graceful_timeout: end them first.
            node.changes.close_streams()
            await stack.aclose()

    async def __aenter__(self) -> RuntimeTransport:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()
