"""The original's node for the HTTP benchmark, run by the original's own venv: `python bench/apps/original.py --port N`.

`promptise==1.10.*`'s `AgentRuntime` with two processes whose model is `promptise.testing.ScriptedModel` (no
network, no key), both started, behind its aiohttp `RuntimeTransport` on uvloop. It mirrors `bench/apps/node.py`:
`worker` is the event target, `idle` only exists. Runs until SIGINT/SIGTERM, then stops the transport and the runtime.
Stands alone (standard library plus promptise): the original's venv has no promptise_asgi and no bench package.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys

__all__ = ["main"]

NODE_ID = "bench"


def _config(instructions: str) -> object:
    from promptise.runtime import ProcessConfig
    from promptise.testing import ScriptedModel

    model = ScriptedModel(["ok"], on_exhausted="repeat_last")
    return ProcessConfig(model=model, instructions=instructions)


async def _serve(host: str, port: int) -> None:
    from promptise.runtime import AgentRuntime
    from promptise.runtime.distributed.transport import RuntimeTransport

    runtime = AgentRuntime()
    await runtime.add_process("worker", _config("Handle the event."))
    await runtime.add_process("idle", _config("Wait."))
    await runtime.start_all()
    transport = RuntimeTransport(runtime, host=host, port=port, node_id=NODE_ID)
    await transport.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await transport.stop()
    await runtime.stop_all()


def main(argv: list[str] | None = None) -> int:
    """Serve the original's node until SIGINT/SIGTERM.

    Args:
        argv: Arguments (default: `sys.argv[1:]`).

    Returns:
        The process exit code.
    """
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    # The original logs a warning per dead-lettered event; at tens of thousands a second that would be the
    # benchmark. Our server runs with log level warning too, and ours does not log per refused event.
    logging.basicConfig(level=logging.ERROR)
    import uvloop

    uvloop.run(_serve(args.host, args.port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
