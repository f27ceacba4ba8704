"""A node for the crash tests: one process, `worker`, on a SQLite store, served by RuntimeTransport.

    python tests/durable_node.py --backend asyncio|trio --store FILE --log FILE [--port N] [--concurrency N]
        [--poison-after N] [--handler-delay SECONDS]

uvicorn serves it on asyncio, hypercorn on trio. For every event it handles, `worker` appends
"<event id> <attempt>" to the log file and fsyncs it before returning, so the log holds every delivery that
ran, even across `kill -9`. An event whose payload has `"crash": true` kills the process from inside its
handler (`os._exit`), as a segfault or an OOM kill would. Prints `ready <port>` once it serves.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

import anyio

from promptise_asgi.runtime import AgentRuntime, ProcessConfig, TriggerEvent
from promptise_asgi.store import SQLiteStore
from promptise_asgi.transport import RuntimeTransport


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--backend", choices=["asyncio", "trio"], default="asyncio")
    parser.add_argument("--store", required=True)
    parser.add_argument("--log", required=True)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--poison-after", type=int, default=3)
    parser.add_argument("--handler-delay", type=float, default=0.0, help="seconds each event takes")
    args = parser.parse_args()
    log = os.open(args.log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    async def handle(event: TriggerEvent) -> None:
        if event.payload.get("crash"):
            os._exit(3)
        if args.handler_delay:
            await anyio.sleep(args.handler_delay)
        os.write(log, f"{event.event_id} {event.attempt}\n".encode())
        os.fsync(log)

    async def serve(options: Any) -> None:
        runtime = AgentRuntime(store=SQLiteStore(options.store))
        config = ProcessConfig(handler=handle, concurrency=options.concurrency, poison_after=options.poison_after)
        await runtime.add_process("worker", config)
        async with RuntimeTransport(runtime, port=options.port, node_id="durable") as transport:
            print(f"ready {transport.port}", flush=True)
            await anyio.sleep_forever()

    anyio.run(serve, args, backend=args.backend)


if __name__ == "__main__":
    main()
