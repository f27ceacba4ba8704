"""The `promptise-asgi` command: run a node, a coordinator, the demo cluster, or show cluster status.

Every failure (missing file, bad config, dead coordinator, port in use, a bad flag) exits non-zero with one
clear line naming what the user typed, and no traceback. Ctrl-C or SIGTERM stops a command at any moment,
also while it starts, with one line. Tokens come from the environment or the config file, never from flags
(they would show in `ps`). This module wires the public pieces together; docs/cli.md is its reference, and
a test keeps it in step with `--help`.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import anyio
from anyio.abc import TaskStatus

from ._cli_parser import build_parser, url_argument
from ._errors import PromptiseASGIError

__all__ = ["main"]

logger = logging.getLogger("promptise_asgi.cli")

# Exit statuses (docs/cli.md): 0 done, or a running server stopped by Ctrl-C/SIGTERM (how servers stop);
# 1 a failure; 2 a usage error; 130 interrupted before it was up (a server while starting, `status` waiting).
EXIT_FAILURE = 1
EXIT_INTERRUPTED = 130


class CommandError(Exception):
    """A failure to report as one line on stderr."""


# -- running a command --------------------------------------------------------------------------------------

Command = Callable[[argparse.Namespace, "_Stop"], Awaitable[int]]


SERVERS = ("node", "coordinator", "demo")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the process exit status (docs/cli.md, "Exit status")."""
    command = ""
    try:
        args = build_parser().parse_args(argv)
        command = args.command
        logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        # httpx logs every request at INFO, and the transport where a node serves, which each command prints
        # itself: noise on a command line.
        noisy = ["httpx", "promptise_asgi.transport"]
        if command == "demo":  # the demo prints its cluster itself; its audit lines and temporary stores are noise
            noisy += ["promptise_asgi.audit", "promptise_asgi.store"]
        for name in noisy:
            logging.getLogger(name).setLevel(max(logging.WARNING, logging.getLogger().level))
        # Synchronous work (reading the config, importing handlers) runs before the event loop, where Ctrl-C
        # interrupts it at once: a loop's signal handler would wait for a slow import to finish.
        prepare = _PREPARE.get(command)
        if prepare is not None:
            prepare(args)
        code: int = anyio.run(_run, args, **_backend_options())
    except KeyboardInterrupt:
        # Ctrl-C before the command's own signal handling is in place (it is the first thing it does).
        return _interrupted(command)
    except (CommandError, PromptiseASGIError, OSError, ValueError) as exc:
        print(f"promptise-asgi {command}: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    return code


def _interrupted(command: str) -> int:
    program = f"promptise-asgi {command}" if command else "promptise-asgi"
    print(f"{program}: interrupted" + (" while starting" if command in SERVERS else ""), file=sys.stderr, flush=True)
    return EXIT_INTERRUPTED


def _backend_options() -> dict[str, Any]:
    if importlib.util.find_spec("uvloop") is None:
        return {}
    return {"backend_options": {"use_uvloop": True}}


class _Stop:
    """Ctrl-C and SIGTERM: the first cuts a start (or a request) short, or ends a running command gracefully;
    a second, while stopping, exits at once."""

    def __init__(self, command: str) -> None:
        self.command = command
        self.requested = anyio.Event()
        self._sections: set[anyio.CancelScope] = set()

    @contextmanager
    def cuts_short(self) -> Iterator[None]:
        """A section (a start, a one-shot request) that a stop request cancels; check `requested` after it."""
        with anyio.CancelScope() as scope:
            if self.requested.is_set():
                scope.cancel()
            self._sections.add(scope)
            try:
                yield
            finally:
                self._sections.discard(scope)

    async def watch(self, *, task_status: TaskStatus[None]) -> None:
        with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            task_status.started()
            async for _ in signals:
                if self.requested.is_set():
                    # Whoever presses Ctrl-C twice does not want to wait for a graceful stop.
                    print(f"promptise-asgi {self.command}: stopped at once", file=sys.stderr, flush=True)
                    os._exit(EXIT_INTERRUPTED)
                self.requested.set()
                for scope in list(self._sections):
                    scope.cancel()


async def _run(args: argparse.Namespace) -> int:
    stop = _Stop(args.command)
    run = _RUN[args.command]
    failure: Exception | None = None
    code = 0
    async with anyio.create_task_group() as tg:
        # From here on the signals are ours: Ctrl-C cuts a start short where it is safe to, instead of raising
        # KeyboardInterrupt wherever the event loop happens to be (which left servers behind, with a traceback).
        await tg.start(stop.watch)
        try:
            code = await run(args, stop)
        except Exception as exc:  # re-raised outside the task group, which would wrap it in an ExceptionGroup
            failure = exc
        tg.cancel_scope.cancel()
    if failure is not None:
        raise failure
    return code


def _check_host(host: str, where: str) -> None:
    """Fail with one line naming the host when it cannot be bound at all, before any talk of tokens."""
    if host in ("", "0.0.0.0", "::"):
        return
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.bind((host, 0))
    except socket.gaierror as exc:
        raise CommandError(f"cannot listen on {where} {host!r}: no such host ({exc.strerror})") from None
    except OSError as exc:
        raise CommandError(
            f"cannot listen on {where} {host!r}: not an address of this machine ({exc.strerror})"
        ) from None


def _refuse_unprotected(host: str, token: str | None, allow_unauthenticated: bool, token_source: str) -> None:
    from ._validation import exposed_without_token

    if not exposed_without_token(host, has_token=bool(token), allow_unauthenticated=allow_unauthenticated):
        return
    raise CommandError(
        f"refusing to bind {host!r} without a token: set {token_source}, bind 127.0.0.1, or pass "
        "--allow-unauthenticated if a proxy or private network protects the port"
    )


def _env_token(name: str) -> str | None:
    from ._validation import clean_token

    value = os.environ.get(name) or None
    if value is None:
        return None
    try:
        return clean_token(value)
    except ValueError:
        raise CommandError(f"{name} must be printable ASCII without spaces (its value is not shown)") from None


def _operator_token() -> str | None:
    return _env_token("PROMPTISE_AUTH_TOKEN")


def _node_token() -> str | None:
    """The token the coordinator sends to nodes and requires from them to register (default: the operator's)."""
    return _env_token("PROMPTISE_NODE_TOKEN") or _operator_token()


def _where(url: str, host: str) -> str:
    """How the startup line names the address: a wildcard serves every interface, not the loopback URL."""
    if host in ("", "0.0.0.0", "::"):
        return f"every interface, port {url.rsplit(':', 1)[1]} ({url} from this machine)"
    return url


def _prepare_node(args: argparse.Namespace) -> None:
    from .config import resolve_settings

    # Like uvicorn's --app-dir default: "module:function" handlers are importable from the current directory.
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    settings = resolve_settings(
        args.config,
        overrides={
            "host": args.host,
            "port": args.port,
            "node_id": args.node_id,
            "server": args.server,
            "coordinator_url": args.coordinator,
            "advertise_url": args.advertise_url,
            "etcd": args.etcd,
            "store": args.store,
        },
    )
    args.allow_unauthenticated = args.allow_unauthenticated or settings.allow_unauthenticated
    _check_host(settings.host, "--host" if args.host else f"the host of {settings.source}")
    token_source = "PROMPTISE_AUTH_TOKEN (or [node] auth_token)"
    _refuse_unprotected(settings.host, settings.auth_token, args.allow_unauthenticated, token_source)
    args.settings = settings


async def _run_node(args: argparse.Namespace, stop: _Stop) -> int:
    from .config import NodeSettings
    from .discovery import SupportsAclose
    from .transport import RuntimeTransport
    from .transport._registration import describe_backend, discovery_for

    settings: NodeSettings = args.settings
    allow = args.allow_unauthenticated
    name = f"node {settings.node_id}"
    discovery = discovery_for(settings)
    try:
        with stop.cuts_short():  # RuntimeTransport.start() cleans up after itself when cut short
            transport = RuntimeTransport(
                await settings.build_runtime(),
                settings.host,
                settings.port,
                settings.node_id,
                auth_token=settings.auth_token,
                read_token=settings.read_token,
                allow_unauthenticated=allow,
                trusted_hosts=settings.trusted_hosts,
                server=settings.server,  # type: ignore[arg-type]
                discovery=discovery,
                advertise_url=settings.advertise_url,
                heartbeat_interval=settings.heartbeat_interval,
                max_body_bytes=settings.max_body_bytes,
                log_level="warning",
            )
            await transport.start()
        if stop.requested.is_set():
            return _interrupted("node")
        try:
            processes = ", ".join(spec.name for spec in settings.processes) or "none"
            print(f"{name} serving on {_where(transport.url, settings.host)}; processes: {processes}", flush=True)
            if discovery is not None and transport.advertised_url is not None:
                derived = settings.advertise_url is None and transport.advertised_url != transport.url
                note = " (derived from this machine's name or address; --advertise-url to choose)" if derived else ""
                print(f"  registering with {describe_backend(discovery)} as {transport.advertised_url}{note}")
            await stop.requested.wait()
        finally:
            await transport.stop()
    finally:
        if isinstance(discovery, SupportsAclose):
            await discovery.aclose()
    print(f"{name} stopped", flush=True)
    return 0


def _prepare_coordinator(args: argparse.Namespace) -> None:
    args.token, args.node_token = _operator_token(), _node_token()
    _check_host(args.host, "--host")
    _refuse_unprotected(args.host, args.token, args.allow_unauthenticated, "PROMPTISE_AUTH_TOKEN")


async def _run_coordinator(args: argparse.Namespace, stop: _Stop) -> int:
    from ._server import AppServer
    from .coordinator import RuntimeCoordinator, create_coordinator_app
    from .discovery import ProcessDiscovery, RegistryDiscovery, SupportsAclose

    token, node_token = args.token, args.node_token
    discovery: ProcessDiscovery
    if args.etcd:
        from .etcd import EtcdDiscovery

        discovery = EtcdDiscovery(args.etcd, ttl=args.ttl)
    else:
        discovery = RegistryDiscovery(ttl=args.ttl)
    coordinator = RuntimeCoordinator(
        discovery=discovery,
        health_check_interval=args.health_check_interval,
        node_timeout=args.node_timeout,
        auth_token=node_token,
        node_networks=args.node_network,
    )
    app = create_coordinator_app(
        coordinator,
        auth_token=token,
        read_token=_env_token("PROMPTISE_READ_TOKEN"),
        allow_unauthenticated=args.allow_unauthenticated,
    )
    server = AppServer(app, args.host, args.port, name="coordinator")
    try:
        # Entered outside the section a Ctrl-C cuts short: the coordinator holds a task group open until it exits.
        async with coordinator:
            with stop.cuts_short():  # AppServer.start() cleans up after itself when cut short
                await server.start()
            if stop.requested.is_set():
                return _interrupted("coordinator")
            try:
                kept = f"etcd {', '.join(args.etcd)}" if args.etcd else f"an in-process registry (ttl {args.ttl:g}s)"
                print(f"coordinator serving on {_where(server.url, args.host)}, nodes kept in {kept}", flush=True)
                await stop.requested.wait()
            finally:
                coordinator.change_hub.close()  # open change streams (a dashboard) must not hold the stop up
                await server.stop()
    finally:
        if isinstance(discovery, SupportsAclose):
            await discovery.aclose()
    print("coordinator stopped", flush=True)
    return 0


async def _run_status(args: argparse.Namespace, stop: _Stop) -> int:
    from .client import CoordinatorClient

    url = args.coordinator
    if url is None:
        value = os.environ.get("PROMPTISE_COORDINATOR_URL")
        if not value:
            raise CommandError("pass --coordinator URL (or host:port), or set PROMPTISE_COORDINATOR_URL")
        try:
            url = url_argument(value)
        except argparse.ArgumentTypeError as exc:
            raise CommandError(f"PROMPTISE_COORDINATOR_URL {exc}") from None
    token = _operator_token()
    status: dict[str, Any] = {}
    async with CoordinatorClient(url, auth_token=token, timeout=args.timeout) as client:
        with stop.cuts_short():
            status = await _cluster_status(client, token)  # also tells a node or a bad token apart, first
        if stop.requested.is_set():
            return _interrupted("status")
        if args.watch:
            await _watch(client, stop)  # until Ctrl-C: a clean stop, like a server's
            return 0
    print(format_status(status))
    return 0


async def _watch(client: Any, stop: _Stop) -> None:
    """Redraw the table from the change stream (at most four times a second) until a stop is asked for."""
    from ._client import ClusterView

    view = ClusterView()
    changed = anyio.Event()
    tty = sys.stdout.isatty()
    last: list[str] = [""]

    async def read() -> None:
        nonlocal changed
        async with client.changes() as changes:
            async for change in changes:
                view.apply(change)
                last[0] = f"{change.type} at {time.strftime('%H:%M:%S')}"
                changed.set()

    async def draw() -> None:
        nonlocal changed
        while True:
            await changed.wait()
            changed = anyio.Event()
            header = f"watching {client.url} (Ctrl-C to stop); last change: {last[0]}"
            # On a terminal the table is redrawn in place; in a file or a pipe each version follows the last.
            print(("\x1b[H\x1b[2J" if tty else "") + header + "\n" + format_status(view.status()) + "\n", flush=True)
            await anyio.sleep(0.25)

    async with anyio.create_task_group() as tg:
        tg.start_soon(read)
        tg.start_soon(draw)
        await stop.requested.wait()
        tg.cancel_scope.cancel()
    print("stopped watching", flush=True)


async def _cluster_status(client: Any, token: str | None) -> dict[str, Any]:
    from .client import CoordinatorError, CoordinatorTimeoutError, CoordinatorUnreachableError

    url = client.url
    try:
        status: dict[str, Any] = await client.cluster_status()
        return status
    except CoordinatorTimeoutError:
        raise CommandError(f"the coordinator at {url} did not answer in time (--timeout)") from None
    except CoordinatorUnreachableError as exc:
        raise CommandError(f"coordinator unreachable at {url} ({exc.reason}): is it running there?") from None
    except CoordinatorError as exc:
        refusal = exc
    # A node answers /cluster/status with 404, or 401 when it has a token: its open /health tells it apart.
    node_id = await _node_id_at(client) if refusal.status_code in (401, 403, 404) else None
    if node_id is not None:
        raise CommandError(
            f"{url} is a node ({node_id!r}), not a coordinator: pass --coordinator the URL that "
            "`promptise-asgi coordinator` prints"
        )
    if refusal.status_code == 401 and token is None:
        raise CommandError(f"the coordinator at {url} needs a token: set PROMPTISE_AUTH_TOKEN to its operator token")
    if refusal.status_code == 403 and "has no token" in refusal.message:
        raise CommandError(
            f"the coordinator at {url} has no token, so it answers its own machine only: run status there, "
            "or give the coordinator a token (PROMPTISE_AUTH_TOKEN) and set the same one here"
        )
    if refusal.status_code in (401, 403):
        raise CommandError(
            f"the coordinator at {url} refused the token in PROMPTISE_AUTH_TOKEN ({refusal.status_code}: "
            f"{refusal.message}): set it to the coordinator's operator token"
        )
    if refusal.status_code == 404:
        raise CommandError(f"{url} answered 404 to /cluster/status: it is not a promptise-asgi coordinator")
    raise CommandError(str(refusal))


async def _node_id_at(client: Any) -> str | None:
    try:
        health = await client.health()
    except PromptiseASGIError:
        return None
    node_id = health.get("node_id")
    return node_id if isinstance(node_id, str) and health.get("role") != "coordinator" else None


def format_status(status: dict[str, Any], *, now: float | None = None) -> str:
    """Render `cluster_status()` as an aligned table, one row per node, and a summary line.

    Args:
        status: the coordinator's cluster status.
        now: the wall-clock time to measure "last seen" ages from (default: now).
    """
    now = time.time() if now is None else now
    rows = [("NODE", "URL", "HEALTH", "PROCESSES")]
    for node_id, node in sorted(status.get("nodes", {}).items()):
        health = str(node.get("status", "unknown"))
        seen = node.get("last_seen")
        age = f"last seen {_age(now - seen)} ago" if isinstance(seen, int | float) else ""
        if node.get("missed_check") and health == "healthy":
            health = "healthy (missed check" + (f", {age})" if age else ")")
        elif health == "unhealthy" and age:
            health = f"unhealthy ({age})"
        processes = str(node.get("process_count", 0)) if node.get("status") == "healthy" else "-"
        rows.append((node_id, str(node.get("url", "")), health, processes))
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    lines = ["  ".join(cell.ljust(widths[i]) if i < 3 else cell for i, cell in enumerate(row)).rstrip() for row in rows]
    total = status.get("total_nodes", 0)
    lines.append(
        f"{total} node{'s' if total != 1 else ''}, {status.get('healthy_nodes', 0)} healthy, "
        f"{status.get('total_processes', 0)} processes"
    )
    return "\n".join(lines)


def _age(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m"
    return f"{seconds // 3600}h"


def _program() -> str:
    """How the user ran this program, to print commands they can paste."""
    argv0 = sys.argv[0] if sys.argv else ""
    if os.path.basename(argv0) != "promptise-asgi":
        return f"{_shown_path(sys.executable)} -m promptise_asgi"
    on_path = shutil.which("promptise-asgi")
    if on_path is not None and os.path.realpath(on_path) == os.path.realpath(argv0):
        return "promptise-asgi"
    return _shown_path(argv0)


def _shown_path(path: str) -> str:
    relative = os.path.relpath(path)
    return path if relative.startswith("..") else relative


async def _run_demo(args: argparse.Namespace, stop: _Stop) -> int:
    from ._server import AppServer
    from .config import demo_settings
    from .coordinator import RuntimeCoordinator, create_coordinator_app
    from .discovery import CoordinatorDiscovery, RegistryDiscovery
    from .transport import RuntimeTransport

    coordinator = RuntimeCoordinator(
        discovery=RegistryDiscovery(ttl=15), health_check_interval=args.interval, request_timeout=2
    )
    server = AppServer(create_coordinator_app(coordinator), "127.0.0.1", args.port, name="demo coordinator")
    nodes: list[tuple[RuntimeTransport, list[str]]] = []
    discoveries: list[CoordinatorDiscovery] = []
    # Entered outside the section a Ctrl-C cuts short: the coordinator holds a task group open until it exits.
    # The demo's nodes keep their events in files that go when it ends.
    async with coordinator:
        data = tempfile.mkdtemp(prefix="promptise-demo-")
        try:
            with stop.cuts_short():  # each start() cleans up after itself when cut short
                await server.start()
                for index in (1, 2):
                    settings = demo_settings()
                    settings.store = os.path.join(data, f"demo-node-{index}.sqlite3")
                    discoveries.append(CoordinatorDiscovery(server.url))
                    node = RuntimeTransport(
                        await settings.build_runtime(),
                        port=0 if args.port == 0 else args.port + index,
                        node_id=f"demo-node-{index}",
                        discovery=discoveries[-1],
                        heartbeat_interval=5,
                    )
                    await node.start()
                    nodes.append((node, [spec.name for spec in settings.processes]))
                for _ in range(100):  # they register in the background, in a moment: show them in the first table
                    if len(coordinator.nodes) == len(nodes):
                        break
                    await anyio.sleep(0.05)
            if stop.requested.is_set():
                return _interrupted("demo")
            _print_demo_intro(server.url, nodes)
            async with anyio.create_task_group() as tg:

                async def report() -> None:
                    cycle = 0
                    while args.cycles == 0 or cycle < args.cycles:
                        cycle += 1
                        print(format_status(await coordinator.cluster_status()) + "\n", flush=True)
                        if args.cycles == 0 or cycle < args.cycles:
                            await anyio.sleep(args.interval)
                    tg.cancel_scope.cancel()

                async def until_stopped() -> None:
                    await stop.requested.wait()
                    tg.cancel_scope.cancel()

                tg.start_soon(report)
                tg.start_soon(until_stopped)
        finally:
            for node, _ in reversed(nodes):
                await node.stop()
            for discovery in discoveries:
                await discovery.aclose()
            coordinator.change_hub.close()  # open change streams (a dashboard) must not hold the stop up
            await server.stop()
            shutil.rmtree(data, ignore_errors=True)
    print("demo cluster stopped", flush=True)
    return 0


def _print_demo_intro(coordinator_url: str, nodes: list[tuple[Any, list[str]]]) -> None:
    first, processes = nodes[0][0], nodes[0][1]
    event = "echo" if "echo" in processes else processes[0]
    lines = [
        "demo cluster: a coordinator and two nodes on this machine; Ctrl-C to stop",
        f"  coordinator  {coordinator_url}",
        f"  dashboard    {coordinator_url}/ui/  (open it in a browser)",
        *(f"  {node.node_id}  {node.url}  processes: {', '.join(names)}" for node, names in nodes),
        "try, in another terminal:",
        f"  {_program()} status --watch --coordinator {coordinator_url}",
        f"  curl -s -X POST {coordinator_url}/cluster/nodes/{first.node_id}/processes/{event}/event "
        '-H \'content-type: application/json\' -d \'{"payload": {"hello": "world"}}\'',
        f"  (the {event} process of {first.node_id} logs the payload here)",
        "",
    ]
    print("\n".join(lines), flush=True)


# What each command does: an optional synchronous preparation (before the event loop), then its run.
_PREPARE: dict[str, Callable[[argparse.Namespace], None]] = {"node": _prepare_node, "coordinator": _prepare_coordinator}
_RUN: dict[str, Command] = {
    "node": _run_node,
    "coordinator": _run_coordinator,
    "status": _run_status,
    "demo": _run_demo,
}
