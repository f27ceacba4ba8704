"""The `promptise-asgi` command: run a node, a coordinator, the demo cluster, or show cluster status.

Every failure (missing file, bad config, dead coordinator, port in use) exits non-zero with one clear line
and no traceback. Tokens come from the environment or the config file, never from flags (they would show
in `ps`). This module wires the public pieces together; it holds no logic of its own worth testing apart.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import tempfile
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AsyncExitStack
from typing import Any

import anyio

from ._errors import PromptiseASGIError

__all__ = ["main"]

logger = logging.getLogger("promptise_asgi.cli")


class CommandError(Exception):
    """A failure to report as one line on stderr."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="promptise-asgi",
        description="Run, discover and steer distributed agent processes over HTTP.",
    )
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    node = commands.add_parser("node", help="run one node from a TOML config file")
    node.add_argument("--config", help="node TOML file (default: $PROMPTISE_CONFIG, ./promptise.toml, the demo)")
    node.add_argument("--host", help="interface to bind (default 127.0.0.1, or [node] host)")
    node.add_argument("--port", type=int, help="TCP port (default 9100, or [node] port; 0 picks a free one)")
    node.add_argument("--node-id", help="node id (default $PROMPTISE_NODE_ID, or [node] id)")
    node.add_argument("--server", choices=["uvicorn", "hypercorn"], help="ASGI server (default uvicorn)")
    node.add_argument("--coordinator", help="register with this coordinator URL ($PROMPTISE_COORDINATOR_URL)")
    node.add_argument("--advertise-url", help="URL other machines reach this node at ($PROMPTISE_ADVERTISE_URL)")
    node.add_argument("--etcd", help="register in etcd at these endpoint URL(s), comma-separated")
    node.add_argument(
        "--store",
        metavar="PATH|memory",
        help="keep accepted events in this SQLite file, or 'memory' to keep them in memory only "
        "($PROMPTISE_STORE, or [node] store; default ./promptise-data/<node-id>.sqlite3)",
    )
    node.add_argument(
        "--allow-unauthenticated", action="store_true", help="bind a non-loopback host without PROMPTISE_AUTH_TOKEN"
    )
    node.set_defaults(run=_run_node)

    coordinator = commands.add_parser("coordinator", help="run a coordinator (cluster view and node registry)")
    coordinator.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1)")
    coordinator.add_argument("--port", type=int, default=9000, help="TCP port (default 9000)")
    coordinator.add_argument("--etcd", help="etcd endpoint URL(s), comma-separated, to keep the registry in")
    coordinator.add_argument("--ttl", type=float, default=60.0, help="seconds a node stays listed without a heartbeat")
    coordinator.add_argument("--health-check-interval", type=float, default=15.0, help="seconds (default 15)")
    coordinator.add_argument("--node-timeout", type=float, default=45.0, help="seconds (default 45)")
    coordinator.add_argument(
        "--allow-unauthenticated", action="store_true", help="bind a non-loopback host without PROMPTISE_AUTH_TOKEN"
    )
    coordinator.add_argument(
        "--node-network",
        action="append",
        default=[],
        metavar="CIDR",
        help="only call nodes whose address is in this network (repeatable; default: any but link-local)",
    )
    coordinator.set_defaults(run=_run_coordinator)

    status = commands.add_parser("status", help="print the cluster as a table")
    status.add_argument("--coordinator", help="coordinator URL (default $PROMPTISE_COORDINATOR_URL)")
    status.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for the answer (default 10)")
    status.set_defaults(run=_run_status)

    demo = commands.add_parser("demo", help="a coordinator and two nodes on loopback, printing cluster status")
    demo.add_argument("--port", type=int, default=9000, help="coordinator port (nodes take the next two)")
    demo.add_argument("--interval", type=float, default=5.0, help="seconds between status prints (default 5)")
    demo.add_argument("--cycles", type=int, default=0, help="stop after this many prints (default: until Ctrl-C)")
    demo.set_defaults(run=_run_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the process exit status."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # httpx logs every request at INFO: noise on a command line.
    logging.getLogger("httpx").setLevel(max(logging.WARNING, logging.getLogger().level))
    run: Callable[[argparse.Namespace], Awaitable[None]] = args.run
    try:
        anyio.run(run, args, **_backend_options())
    except KeyboardInterrupt:
        return 130
    except (CommandError, PromptiseASGIError, OSError, ValueError) as exc:
        print(f"promptise-asgi {args.command}: {exc}", file=sys.stderr)
        return 1
    return 0


def _backend_options() -> dict[str, Any]:
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return {}
    return {"backend_options": {"use_uvloop": True}}


async def _wait_for_signal() -> None:
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for _ in signals:
            return


async def _run_node(args: argparse.Namespace) -> None:
    from .config import resolve_settings
    from .discovery import SupportsAclose
    from .transport import RuntimeTransport
    from .transport._registration import discovery_for

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
    runtime = await settings.build_runtime()
    discovery = discovery_for(settings)
    transport = RuntimeTransport(
        runtime,
        settings.host,
        settings.port,
        settings.node_id,
        auth_token=settings.auth_token,
        allow_unauthenticated=args.allow_unauthenticated or settings.allow_unauthenticated,
        trusted_hosts=settings.trusted_hosts,
        server=settings.server,  # type: ignore[arg-type]
        discovery=discovery,
        advertise_url=settings.advertise_url,
        heartbeat_interval=settings.heartbeat_interval,
        max_body_bytes=settings.max_body_bytes,
        log_level="warning",
    )
    try:
        async with transport:
            print(f"node {settings.node_id} serving {len(settings.processes)} processes on {transport.url}", flush=True)
            await _wait_for_signal()
    finally:
        if isinstance(discovery, SupportsAclose):
            await discovery.aclose()


def _coordinator_token() -> str | None:
    return os.environ.get("PROMPTISE_AUTH_TOKEN") or None


def _node_token() -> str | None:
    """The token the coordinator sends to nodes and requires from them to register (default: the operator's)."""
    return os.environ.get("PROMPTISE_NODE_TOKEN") or _coordinator_token()


async def _run_coordinator(args: argparse.Namespace) -> None:
    from ._server import AppServer
    from ._validation import exposed_without_token
    from .coordinator import RuntimeCoordinator, create_coordinator_app
    from .discovery import ProcessDiscovery, RegistryDiscovery, SupportsAclose

    token = _coordinator_token()
    if exposed_without_token(args.host, has_token=bool(token), allow_unauthenticated=args.allow_unauthenticated):
        raise CommandError(
            f"refusing to bind {args.host!r} without a token: set PROMPTISE_AUTH_TOKEN, bind 127.0.0.1, "
            "or pass --allow-unauthenticated if a proxy or private network protects the port"
        )
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
        auth_token=_node_token(),
        node_networks=args.node_network,
    )
    app = create_coordinator_app(coordinator, auth_token=token, allow_unauthenticated=args.allow_unauthenticated)
    server = AppServer(app, args.host, args.port, name="coordinator")
    try:
        async with coordinator:
            await server.start()
            try:
                where = f"etcd {args.etcd}" if args.etcd else f"an in-process registry (ttl {args.ttl:g}s)"
                print(f"coordinator serving on {server.url}, nodes kept in {where}", flush=True)
                await _wait_for_signal()
            finally:
                await server.stop()
    finally:
        if isinstance(discovery, SupportsAclose):
            await discovery.aclose()


async def _run_status(args: argparse.Namespace) -> None:
    from .client import NodeClient, NodeError, NodeTimeoutError, NodeUnreachableError

    url = args.coordinator or os.environ.get("PROMPTISE_COORDINATOR_URL")
    if not url:
        raise CommandError("pass --coordinator URL or set PROMPTISE_COORDINATOR_URL")
    async with NodeClient(url, auth_token=_coordinator_token(), timeout=args.timeout) as client:
        try:
            status = await client.request("GET", "/cluster/status")
        except NodeUnreachableError as exc:
            what = "did not answer" if isinstance(exc, NodeTimeoutError) else "is unreachable"
            raise CommandError(f"coordinator {what} at {url}" + (f" ({exc.reason})" if exc.reason else "")) from None
        except NodeError as exc:
            raise CommandError(f"coordinator at {url} answered {exc.status_code}: {exc.message}") from None
    print(format_status(status))


def format_status(status: dict[str, Any]) -> str:
    """Render `cluster_status()` as an aligned table, one row per node, and a summary line."""
    rows = [("NODE", "URL", "HEALTH", "PROCESSES")]
    for node_id, node in sorted(status.get("nodes", {}).items()):
        health = str(node.get("status", "unknown"))
        if node.get("missed_check") and health == "healthy":
            health = "healthy (missed check)"
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


async def _run_demo(args: argparse.Namespace) -> None:
    from ._server import AppServer
    from .config import demo_settings
    from .coordinator import RuntimeCoordinator, create_coordinator_app
    from .discovery import CoordinatorDiscovery, RegistryDiscovery
    from .transport import RuntimeTransport

    registry = RegistryDiscovery(ttl=15)
    coordinator = RuntimeCoordinator(discovery=registry, health_check_interval=args.interval, request_timeout=2)
    server = AppServer(create_coordinator_app(coordinator), "127.0.0.1", args.port, name="demo coordinator")
    server.bind()
    async with coordinator, AsyncExitStack() as stack:
        stack.callback(server.close)
        await server.start()
        stack.push_async_callback(server.stop)
        # The demo's nodes keep their events in files that go when it ends.
        data = stack.enter_context(tempfile.TemporaryDirectory(prefix="promptise-demo-"))
        for index in (1, 2):
            port = 0 if args.port == 0 else args.port + index
            settings = demo_settings()
            settings.store = os.path.join(data, f"demo-node-{index}.sqlite3")
            runtime = await settings.build_runtime()
            discovery = await stack.enter_async_context(CoordinatorDiscovery(server.url))
            node = RuntimeTransport(
                runtime, port=port, node_id=f"demo-node-{index}", discovery=discovery, heartbeat_interval=5
            )
            await stack.enter_async_context(node)
        print(f"demo cluster: coordinator on {server.url}; Ctrl-C to stop", flush=True)
        print(f"  try: promptise-asgi status --coordinator {server.url}", flush=True)
        async with anyio.create_task_group() as tg:

            async def report() -> None:
                cycle = 0
                while args.cycles == 0 or cycle < args.cycles:
                    cycle += 1
                    print(format_status(await coordinator.cluster_status()) + "\n", flush=True)
                    if args.cycles == 0 or cycle < args.cycles:
                        await anyio.sleep(args.interval)
                tg.cancel_scope.cancel()

            async def until_signal() -> None:
                await _wait_for_signal()
                tg.cancel_scope.cancel()

            tg.start_soon(report)
            tg.start_soon(until_signal)
    print("demo cluster stopped", flush=True)
