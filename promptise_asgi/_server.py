"""`RuntimeTransport`: serve a node app in-process with uvicorn (asyncio) or hypercorn (asyncio or trio).

We bind the listening socket ourselves, so a port in use is a plain `OSError` raised by `start()` and
`port=0` reports the port the kernel chose, then hand that socket to the server. The server never installs
signal handlers: the host program owns SIGINT/SIGTERM. Knows servers and sockets, not the HTTP API.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import ssl
from collections.abc import Sequence
from contextlib import AsyncExitStack
from types import TracebackType
from typing import Any, Literal

import anyio
import sniffio
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ._http import is_loopback_host, normalize_tokens
from ._node_app import create_transport_app, node_lifespan
from ._protocol import RuntimeLike
from ._server_limits import ServerLimits, configure_hypercorn, limit_requests, uvicorn_options, uvicorn_protocol
from ._tasks import spawn_detached

__all__ = ["AppServer", "RuntimeTransport"]

logger = logging.getLogger("promptise_asgi.transport")

ServerName = Literal["uvicorn", "hypercorn"]

READY_TIMEOUT = 30.0


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
        discovery: Any = None,
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
        if not tokens and not allow_unauthenticated and not is_loopback_host(host):
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

    async def _registration(self) -> Any:
        if self.discovery is None:
            return None
        from ._registration import SelfRegistration, registration_url

        url = self.advertise_url or await registration_url(self.url, self.host, self.discovery, self.node_id)
        registration = SelfRegistration(self.discovery, self.node_id, url, interval=self.heartbeat_interval)
        self.app.state.registration = registration  # the node's GET /status shows it
        return registration

    @property
    def advertised_url(self) -> str | None:
        """The URL this node registers under, once started with `discovery` (None otherwise)."""
        registration = getattr(self.app.state, "registration", None)
        return None if registration is None else str(registration.url)

    async def stop(self) -> None:
        """Unregister, stop accepting, let in-flight requests finish, then drain and stop the runtime."""
        stack, self._stack = self._stack, None
        if stack is not None:
            self.app.state.node.phase = "draining"
            await stack.aclose()

    async def __aenter__(self) -> RuntimeTransport:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()


class AppServer:
    """Serve any ASGI app on a socket we bind ourselves, in the current event loop (asyncio or trio).

    Used by `RuntimeTransport` for a node and by the command line for a coordinator. `bind()` may be called
    before `start()` so that an address in use fails before anything else starts. Whichever server runs, it
    enforces the same limits on sizes and times (SPEC 18; docs/server-limits.md).

    Args:
        app: the ASGI app to serve (it gets lifespan events).
        host: interface to bind.
        port: TCP port; 0 picks a free one (read it back from `.port` after `bind()`).
        server: "uvicorn" (default on asyncio) or "hypercorn" (default, and the only choice, on trio).
        ssl_certfile: TLS certificate file passed to the server.
        ssl_keyfile: TLS key file passed to the server.
        graceful_timeout: seconds `stop()` lets in-flight requests finish.
        log_level: the server's log level.
        name: what log messages and task names call this server.
        limit_concurrency: connections served at once (uvicorn) or requests in flight (hypercorn); beyond it
            a request is answered 503.
        max_header_bytes: the largest request head (request line and header fields) accepted; a larger one is
            answered 431 (or 400) and its connection closed.
        read_timeout: seconds a client has to send a complete request head (from connecting, or from the first
            byte of a request after the previous response), and the longest it may pause in the middle of a
            request body; a connection past either is closed (hypercorn answers a stalled body 408 first).

    Raises:
        ValueError: an unknown server, half a TLS pair, or a limit that is not a positive number.
    """

    def __init__(
        self,
        app: ASGIApp,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        server: ServerName | None = None,
        ssl_certfile: str | None = None,
        ssl_keyfile: str | None = None,
        graceful_timeout: float = 5.0,
        log_level: str = "warning",
        name: str = "app",
        limit_concurrency: int = 2048,
        max_header_bytes: int = 64 * 1024,
        read_timeout: float = 10.0,
    ) -> None:
        if server not in (None, "uvicorn", "hypercorn"):
            raise ValueError(f"server must be 'uvicorn' or 'hypercorn', not {server!r}")
        if (ssl_certfile is None) != (ssl_keyfile is None):
            raise ValueError("ssl_certfile and ssl_keyfile must be given together")
        self.app = app
        self.host = host
        self.server = server
        self.ssl_certfile = ssl_certfile
        self.ssl_keyfile = ssl_keyfile
        self.graceful_timeout = graceful_timeout
        self.log_level = log_level
        self.name = name
        self.limits = ServerLimits(limit_concurrency, max_header_bytes, read_timeout)
        self._requested_port = port
        self._sock: socket.socket | None = None
        self._runner: _ServerRunner | None = None

    @property
    def port(self) -> int:
        """The bound port once bound; the requested port otherwise."""
        return int(self._sock.getsockname()[1]) if self._sock is not None else self._requested_port

    @property
    def url(self) -> str:
        """The base URL (loopback form when bound to a wildcard address)."""
        host = self.host
        if host in ("0.0.0.0", ""):
            host = "127.0.0.1"
        elif host == "::":
            host = "::1"
        if ":" in host:
            host = f"[{host}]"
        scheme = "https" if self.ssl_certfile else "http"
        return f"{scheme}://{host}:{self.port}"

    def check_backend(self) -> ServerName:
        """Return the server to use on the running event loop.

        Raises:
            RuntimeError: uvicorn was asked for under trio.
        """
        on_trio = sniffio.current_async_library() == "trio"
        if on_trio and self.server == "uvicorn":
            raise RuntimeError("uvicorn runs only on asyncio; under trio use server='hypercorn' (the default)")
        if self.server is not None:
            return self.server
        return "hypercorn" if on_trio else "uvicorn"

    def bind(self) -> None:
        """Bind and listen (idempotent).

        Raises:
            OSError: the address could not be bound; the message names host and port.
            ValueError: the TLS certificate or key cannot be loaded.
        """
        if self._sock is None:
            if self.ssl_certfile:
                _check_tls_files(self.ssl_certfile, str(self.ssl_keyfile))
            self._sock = _bind(self.host, self._requested_port)

    async def start(self) -> None:
        """Start serving and return once the server has started.

        Raises:
            OSError: the address could not be bound.
            RuntimeError: the server failed to start, or uvicorn was asked for under trio.
        """
        server = self.check_backend()
        self.bind()
        assert self._sock is not None
        runner = _ServerRunner(self, server, self._sock)
        try:
            await runner.start()
        except BaseException:
            self.close()
            raise
        self._runner = runner

    async def stop(self) -> None:
        """Stop accepting, let in-flight requests finish (up to `graceful_timeout`), and close the socket."""
        runner, self._runner = self._runner, None
        try:
            if runner is not None:
                await runner.stop()
        finally:
            self.close()

    def close(self) -> None:
        """Close the listening socket (the server must already be stopped)."""
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()


def _check_tls_files(certfile: str, keyfile: str) -> None:
    # Servers load these only after the app has started (hypercorn after its lifespan): fail first instead.
    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(certfile, keyfile)
    except (OSError, ssl.SSLError) as exc:
        raise ValueError(f"cannot load TLS certificate {certfile!r} with key {keyfile!r}: {exc}") from None


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(2048)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise OSError(exc.errno, f"cannot listen on {host}:{port}: {exc.strerror}") from None
    return sock


class _ServerRunner:
    """Runs one server over an already-listening socket in a detached task."""

    def __init__(self, transport: AppServer, server: ServerName, sock: socket.socket) -> None:
        self.transport = transport
        self.server = server
        self.sock = sock
        self.ready = anyio.Event()
        self.finished = anyio.Event()
        self.shutdown = anyio.Event()
        self.error: BaseException | None = None

    async def start(self) -> None:
        app = _signal_startup(self.transport.app, self.ready)
        serve = self._uvicorn_serve(app) if self.server == "uvicorn" else self._hypercorn_serve(app)

        async def run() -> None:
            try:
                await serve
            except (Exception, SystemExit) as exc:  # uvicorn reports a failed startup with sys.exit()
                self.error = exc
            finally:
                self.finished.set()

        spawn_detached(run, name=f"promptise-asgi {self.server} {self.transport.name}")
        answered = False
        try:
            async with anyio.create_task_group() as tg:

                async def finished_early() -> None:
                    await self.finished.wait()
                    tg.cancel_scope.cancel()

                tg.start_soon(finished_early)
                # The app's startup completing is not enough: hypercorn builds its TLS context and servers after
                # it, and can still fail. Ready means the server answered a request on our socket.
                await self.ready.wait()
                with anyio.move_on_after(READY_TIMEOUT):
                    await self._first_answer()
                    answered = True
                tg.cancel_scope.cancel()
        except BaseException:
            # Cancelled (Ctrl-C while starting): the server must not outlive start().
            with anyio.move_on_after(self.transport.graceful_timeout + 5, shield=True):
                await self.stop()
            raise
        if not answered:
            await self.stop()
            reason = repr(self.error) if self.error is not None else f"no answer within {READY_TIMEOUT:g}s"
            raise RuntimeError(f"the {self.server} server failed to start: {reason}")

    async def _first_answer(self) -> None:
        t = self.transport
        host = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}.get(t.host, t.host)
        port = self.sock.getsockname()[1]
        stream: anyio.abc.ByteStream
        if t.ssl_certfile:
            # Only asks "is anything serving TLS here": the certificate is the client's business, not ours.
            context = ssl.create_default_context()
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
            stream = await anyio.connect_tcp(host, port, ssl_context=context, tls_standard_compatible=False)
        else:
            stream = await anyio.connect_tcp(host, port)
        authority = f"[{host}]" if ":" in host else host
        async with stream:
            await stream.send(f"GET /livez HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\n\r\n".encode())
            await stream.receive()  # any answer at all: the server is serving requests

    async def stop(self) -> None:
        # Through `shutdown` only, which ends uvicorn's main loop below: set while uvicorn is still starting,
        # should_exit makes it skip its shutdown and leave its lifespan task behind.
        self.shutdown.set()
        await self.finished.wait()

    async def _uvicorn_serve(self, app: ASGIApp) -> None:
        import uvicorn

        shutdown = self.shutdown

        class _Server(uvicorn.Server):
            # uvicorn's own handlers would take SIGINT/SIGTERM away from the host program.
            def capture_signals(self) -> Any:
                from contextlib import nullcontext

                return nullcontext()

            async def main_loop(self) -> None:
                # uvicorn checks should_exit every 0.1 s; wake as soon as stop() asks instead.
                counter = 0
                while not shutdown.is_set() and not await self.on_tick(counter):
                    counter = (counter + 1) % 864000
                    with anyio.move_on_after(0.1):
                        await shutdown.wait()

        t = self.transport
        config = uvicorn.Config(
            app,
            lifespan="on",
            log_config=None,
            log_level=t.log_level,
            access_log=False,
            ssl_certfile=t.ssl_certfile,
            ssl_keyfile=t.ssl_keyfile,
            timeout_graceful_shutdown=math.ceil(t.graceful_timeout),
            http=uvicorn_protocol(t.limits),
            **uvicorn_options(t.limits),
        )
        await _Server(config).serve(sockets=[self.sock])

    async def _hypercorn_serve(self, app: ASGIApp) -> None:
        from hypercorn.config import Config

        t = self.transport
        config = Config()
        # hypercorn closes the sockets it serves; give it a duplicate so ours stays ours to close.
        config.bind = [f"fd://{os.dup(self.sock.fileno())}"]
        config.accesslog = None
        config.loglevel = t.log_level.upper()
        config.graceful_timeout = t.graceful_timeout
        configure_hypercorn(config, t.limits)
        app = limit_requests(app, t.limits)
        if t.ssl_certfile:
            config.certfile = t.ssl_certfile
            config.keyfile = t.ssl_keyfile
        if sniffio.current_async_library() == "trio":
            from hypercorn.trio import serve as trio_serve

            await trio_serve(app, config, shutdown_trigger=self.shutdown.wait)  # type: ignore[arg-type]
        else:
            from hypercorn.asyncio import serve as asyncio_serve

            await asyncio_serve(app, config, shutdown_trigger=self.shutdown.wait)  # type: ignore[arg-type]


def _signal_startup(app: ASGIApp, ready: anyio.Event) -> ASGIApp:
    """Wrap `app` so `ready` is set once the server has completed lifespan startup."""

    async def wrapped(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "lifespan":
            await app(scope, receive, send)
            return

        async def send_and_signal(message: Message) -> None:
            await send(message)
            if message["type"] == "lifespan.startup.complete":
                ready.set()

        await app(scope, receive, send_and_signal)

    return wrapped
