"""Serve one benchmark app with uvicorn in-process: `python -m bench.apps.serve bare|node|durable --port N`.

`durable` is our node with its events in a SQLite store (`--store FILE`, default `bench-events.sqlite3` in a
new temporary directory).

Every app goes through this one launcher so the server is the same for the ceiling and for ours: uvicorn with
uvloop and httptools, log level warning, no access log. Ours is served as `promptise-asgi node` and
`RuntimeTransport` serve it, with the size and time limits of SPEC 18 (their HTTP protocol), so the figures
include what those limits cost; the ceiling runs on uvicorn's plain protocol. Running `uvicorn.Server.serve()`
ourselves (rather than the `uvicorn` command) lets our node's runtime get its processes added on the server's
own event loop before the app is served, without wrapping the app in an extra layer that every request would
pay for.
Exit code 3 means the app could not be built because promptise_asgi is not there yet.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from typing import Any

import uvicorn
import uvloop

__all__ = ["main"]

NOT_BUILT_EXIT = 3


async def _build(which: str, store: str | None) -> Any:
    if which == "bare":
        from bench.apps.bare import app

        return app
    from bench.apps.node import build_app

    if which == "durable" and store is None:
        store = os.path.join(tempfile.mkdtemp(prefix="bench-store-"), "bench-events.sqlite3")
    return await build_app(store if which == "durable" else None)


async def _serve(which: str, host: str, port: int, store: str | None = None) -> int:
    try:
        app = await _build(which, store)
    except ImportError as exc:
        print(f"not built yet: {exc}", file=sys.stderr)
        return NOT_BUILT_EXIT
    http: Any = "httptools"
    options: dict[str, Any] = {}
    if which != "bare":
        from promptise_asgi._server import ServerLimits
        from promptise_asgi._server._limits import uvicorn_options, uvicorn_protocol

        limits = ServerLimits()
        http, options = uvicorn_protocol(limits), uvicorn_options(limits)
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        loop="none",
        http=http,
        lifespan="on",
        log_level="warning",
        access_log=False,
        **options,
    )
    await uvicorn.Server(config).serve()
    return 0


def main(argv: list[str] | None = None) -> int:
    """Parse the command line and serve until SIGINT/SIGTERM.

    Args:
        argv: Arguments (default: `sys.argv[1:]`).

    Returns:
        The process exit code.
    """
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("app", choices=["bare", "node", "durable"])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--store", help="the durable node's SQLite file")
    args = parser.parse_args(argv)
    return uvloop.run(_serve(args.app, args.host, args.port, args.store))


if __name__ == "__main__":
    sys.exit(main())
