"""`AppServer`: serve any ASGI app in-process with uvicorn (asyncio) or hypercorn (asyncio or trio).

We bind the listening socket ourselves, so a port in use is a plain `OSError` raised by `start()` and
`port=0` reports the port the kernel chose, then hand that socket to the server. The server never installs
signal handlers: the host program owns SIGINT/SIGTERM. Knows servers and sockets, not the apps served.
"""

from __future__ import annotations

import math
import os
import socket
import ssl
from typing import Any, Literal

import anyio
import sniffio
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .._detached import spawn_detached
from ._limits import ServerLimits, configure_hypercorn, limit_requests, uvicorn_options, uvicorn_protocol

__all__ = ["AppServer", "ServerName", "reachable_host"]

ServerName = Literal["uvicorn", "hypercorn"]

_WILDCARDS = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}


def reachable_host(host: str) -> str:
    """The address to connect to a server bound to `host` from this machine (loopback for a wildcard)."""
    return _WILDCARDS.get(host, host)


READY_TIMEOUT = 30.0


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
        host = reachable_host(self.host)
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
        host = reachable_host(t.host)
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
