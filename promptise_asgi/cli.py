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
from collections.abc import Awaitable, Callable, Sequence
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
    node.set_defaults(run=_run_node)

    coordinator = commands.add_parser("coordinator", help="run a coordinator (cluster view and node registry)")
    coordinator.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1)")
    coordinator.add_argument("--port", type=int, default=9000, help="TCP port (default 9000)")
    coordinator.add_argument("--etcd", help="etcd endpoint URL(s), comma-separated, to keep the registry in")
    coordinator.add_argument("--health-check-interval", type=float, default=15.0, help="seconds (default 15)")
    coordinator.add_argument("--node-timeout", type=float, default=45.0, help="seconds (default 45)")
    coordinator.set_defaults(run=_run_coordinator)

    status = commands.add_parser("status", help="print the cluster as a table")
    status.add_argument("--coordinator", help="coordinator URL (default $PROMPTISE_COORDINATOR_URL)")
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
    from ._registration import discovery_for
    from .config import resolve_settings
    from .transport import RuntimeTransport

    settings = resolve_settings(
        args.config,
        overrides={
            "host": args.host,
            "port": args.port,
            "node_id": args.node_id,
            "server": args.server,
            "coordinator_url": args.coordinator,
            "advertise_url": args.advertise_url,
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
        if discovery is not None:
            await discovery.aclose()


async def _run_coordinator(args: argparse.Namespace) -> None:
    raise CommandError("the coordinator is not available in this build")


async def _run_status(args: argparse.Namespace) -> None:
    raise CommandError("cluster status is not available in this build")


async def _run_demo(args: argparse.Namespace) -> None:
    raise CommandError("the demo cluster is not available in this build")


def _env(name: str) -> str | None:
    return os.environ.get(name) or None
