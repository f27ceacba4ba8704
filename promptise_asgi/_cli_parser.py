"""The `promptise-asgi` command line's surface: its commands, flags, help texts and flag checks.

Every flag value is checked here, so an error names the flag the user typed (`--interval must be a number
of seconds > 0`), never a parameter inside; usage errors are one line, like every other failure. Knows
argparse and the package's validation rules; what each command does lives in `cli`.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from typing import Any, NoReturn

__all__ = ["EXIT_USAGE", "build_parser", "url_argument"]

EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    """Usage errors in one line naming the flag, like every other failure; the usage is one --help away."""

    def error(self, message: str) -> NoReturn:
        flag, sep, problem = message.partition(": ")
        if flag.startswith("argument ") and sep:
            flag = flag.removeprefix("argument ").split("/")[-1]
            message = f"{flag} {problem}" if problem.startswith("must") else f"{flag}: {problem}"
        self.exit(EXIT_USAGE, f"{self.prog}: {message} (see {self.prog} --help)\n")


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Shows each option's default, except where there is none worth showing (unset, off, or an empty list)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if "default" in text or default is None or default is False or default is argparse.SUPPRESS or default == []:
            return text
        return text + " (default: %(default)s)"


class _Version(argparse.Action):
    def __init__(self, option_strings: Sequence[str], dest: str = argparse.SUPPRESS, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, *args: Any) -> None:
        print(f"promptise-asgi {_version()}")
        parser.exit()


def _version() -> str:
    from ._version import __version__

    return __version__


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a number of seconds > 0, not {text!r}")
    return value


def _port(text: str) -> int:
    if not text.isdigit() or int(text) > 65535:
        raise argparse.ArgumentTypeError(f"must be a port number from 0 to 65535 (0 picks a free one), not {text!r}")
    return int(text)


def _demo_port(text: str) -> int:
    if not text.isdigit() or int(text) > 65533:
        raise argparse.ArgumentTypeError(
            f"must be a port number from 0 to 65533 (the nodes take the next two), not {text!r}"
        )
    return int(text)


def _count(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"must be a whole number >= 0, not {text!r}")
    return int(text)


def url_argument(text: str) -> str:
    """An http(s) base URL; a bare `host:port` means http, as etcdctl and curl read it."""
    from ._validation import normalize_address_url

    try:
        return normalize_address_url(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an http(s) URL such as http://10.0.0.5:9000, not {text!r}") from None


def _endpoints(text: str) -> list[str]:
    from ._validation import parse_endpoints

    try:
        return list(parse_endpoints(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be etcd URL(s), comma-separated, not {text!r}") from None


def _node_id(text: str) -> str:
    from ._validation import validate_node_id

    try:
        return validate_node_id(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"must be up to 128 letters, digits, '.', '_', ':' or '-', starting with a letter or digit, not {text!r}"
        ) from None


def _network(text: str) -> str:
    from ._validation import NodeAddressRules

    try:
        NodeAddressRules([text])
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a network such as 10.0.0.0/8, not {text!r}") from None
    return text


_NODE_ENVIRONMENT = """\
environment (a flag wins over its variable, and a variable over the config file):
  PROMPTISE_CONFIG                 the config file when --config is not given
  PROMPTISE_NODE_ID                the node id
  PROMPTISE_AUTH_TOKEN             the token this node requires, and sends to its coordinator
  PROMPTISE_COORDINATOR_URL        register with this coordinator
  PROMPTISE_ADVERTISE_URL          the URL other machines reach this node at
  PROMPTISE_ALLOW_UNAUTHENTICATED  1: with no token, serve any peer (like --allow-unauthenticated)
  PROMPTISE_TRUSTED_HOSTS          Host names accepted besides loopback when there is no token
"""
_COORDINATOR_ENVIRONMENT = """\
environment:
  PROMPTISE_AUTH_TOKEN  the operator's token, required on every route but the probes
  PROMPTISE_NODE_TOKEN  the token nodes register with, which the coordinator also sends to nodes
                        (default: PROMPTISE_AUTH_TOKEN)
"""
_STATUS_ENVIRONMENT = """\
environment:
  PROMPTISE_COORDINATOR_URL  the coordinator when --coordinator is not given
  PROMPTISE_AUTH_TOKEN       the coordinator's operator token
"""


def build_parser() -> argparse.ArgumentParser:
    """The `promptise-asgi` parser: the global options and one subparser per command (`args.command`)."""
    options: dict[str, Any] = {"formatter_class": _HelpFormatter}
    # Global options, accepted before and after the command: the commands' copies leave the value alone
    # unless they are given (SUPPRESS), so `--log-level debug node` and `node --log-level debug` agree.
    log_level: dict[str, Any] = {
        "choices": ["debug", "info", "warning", "error"],
        "help": "how much to log on stderr (default: info)",
    }
    common = _Parser(add_help=False)
    common.add_argument("--log-level", default=argparse.SUPPRESS, **log_level)
    parser = _Parser(
        prog="promptise-asgi",
        description="Run, discover and steer distributed agent processes over HTTP.",
        epilog="Run `promptise-asgi COMMAND --help` for a command's options; the reference is docs/cli.md.\n"
        "Exit status: 0 done, or a running server stopped by Ctrl-C or SIGTERM; 1 failed; 2 a bad command\n"
        "line; 130 interrupted before it was up.",
        **options,
    )
    parser.add_argument("--version", action=_Version, help="print the version and exit")
    parser.add_argument("--log-level", default="info", **log_level)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    node = commands.add_parser(
        "node",
        parents=[common],
        help="run one node from a TOML config file",
        description="Serve one node, its processes and their HTTP API, until Ctrl-C.\n"
        "Settings come from the flags, then the environment, then the config file.",
        epilog=_NODE_ENVIRONMENT,
        **options,
    )
    node.add_argument(
        "--config", metavar="FILE", help="node TOML file (default: $PROMPTISE_CONFIG, ./promptise.toml, the demo)"
    )
    node.add_argument("--host", help="interface to bind (default: [node] host, else 127.0.0.1)")
    node.add_argument("--port", type=_port, help="TCP port, 0 for a free one (default: [node] port, else 9100)")
    node.add_argument("--node-id", type=_node_id, metavar="ID", help="node id (default: [node] id, else node-1)")
    node.add_argument(
        "--server", choices=["uvicorn", "hypercorn"], help="ASGI server (default: [node] server, else uvicorn)"
    )
    node.add_argument(
        "--coordinator", type=url_argument, metavar="URL", help="register with this coordinator (or host:port)"
    )
    node.add_argument(
        "--advertise-url",
        type=url_argument,
        metavar="URL",
        help="URL other machines reach this node at (default: the bound address; on 0.0.0.0, this machine's name)",
    )
    node.add_argument(
        "--etcd", type=_endpoints, metavar="URLS", help="register in etcd at these endpoints, comma-separated"
    )
    node.add_argument(
        "--store",
        metavar="PATH|memory",
        help="keep accepted events in this SQLite file, or 'memory' to keep them in memory only "
        "($PROMPTISE_STORE, or [node] store; default ./promptise-data/<node-id>.sqlite3)",
    )
    node.add_argument(
        "--allow-unauthenticated", action="store_true", help="bind a non-loopback host without PROMPTISE_AUTH_TOKEN"
    )

    coordinator = commands.add_parser(
        "coordinator",
        parents=[common],
        help="run a coordinator (cluster view and node registry)",
        description="Serve a coordinator until Ctrl-C: the registry nodes join, their health, and control of\n"
        "their processes.",
        epilog=_COORDINATOR_ENVIRONMENT,
        **options,
    )
    coordinator.add_argument("--host", default="127.0.0.1", help="interface to bind")
    coordinator.add_argument("--port", type=_port, default=9000, help="TCP port, 0 for a free one")
    coordinator.add_argument(
        "--etcd", type=_endpoints, metavar="URLS", help="keep the registry in etcd at these endpoints, comma-separated"
    )
    seconds: dict[str, Any] = {"type": _seconds, "metavar": "SECONDS"}
    coordinator.add_argument("--ttl", default=60.0, help="seconds a node stays listed without a heartbeat", **seconds)
    coordinator.add_argument("--health-check-interval", default=15.0, help="seconds between health checks", **seconds)
    coordinator.add_argument(
        "--node-timeout", default=45.0, help="seconds a node that stops answering stays healthy", **seconds
    )
    coordinator.add_argument(
        "--allow-unauthenticated", action="store_true", help="bind a non-loopback host without PROMPTISE_AUTH_TOKEN"
    )
    coordinator.add_argument(
        "--node-network",
        type=_network,
        action="append",
        default=[],
        metavar="CIDR",
        help="only call nodes whose address is in this network (repeatable; default: any but link-local)",
    )

    status = commands.add_parser(
        "status",
        parents=[common],
        help="print the cluster as a table",
        description="Ask a coordinator for the cluster's status and print one row per node; with --watch,\n"
        "redraw the table on every change the coordinator streams, until Ctrl-C.",
        epilog=_STATUS_ENVIRONMENT,
        **options,
    )
    status.add_argument(
        "--coordinator",
        type=url_argument,
        metavar="URL",
        help="the coordinator's URL or host:port (default: see below)",
    )
    status.add_argument("--timeout", default=10.0, help="seconds to wait for the answer", **seconds)
    status.add_argument(
        "--watch",
        action="store_true",
        help="keep the table up to date from the coordinator's change stream (no polling) until Ctrl-C",
    )

    demo = commands.add_parser(
        "demo",
        parents=[common],
        help="a coordinator and two nodes on loopback, printing cluster status",
        description="Run a coordinator and two demo nodes on this machine, print how to reach them, then\n"
        "print the cluster's status until Ctrl-C. Reads no environment variables.",
        **options,
    )
    demo.add_argument("--port", type=_demo_port, default=9000, help="coordinator port; the nodes take the next two")
    demo.add_argument("--interval", default=5.0, help="seconds between status prints", **seconds)
    demo.add_argument(
        "--cycles", type=_count, default=0, metavar="N", help="stop after this many prints; 0 runs until Ctrl-C"
    )
    return parser
