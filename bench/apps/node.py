"""Our node for the HTTP benchmark: the built-in runtime with two processes behind `create_transport_app`.

Process `worker` has a trivial async handler (it is the target of `POST /processes/worker/event`), process `idle`
has none. The app owns the runtime (`manage_runtime=True`), so uvicorn's lifespan starts and stops it, exactly as
`uvicorn promptise_asgi:app` would. With a store file the runtime keeps its events in a `SQLiteStore` there (the
durable node); with `BENCH_HANDLED_LOG` set, the handler appends each event id it handles to that file (the
crash benchmark reads it). Importing this module does not import promptise_asgi: `build_app` does, so the
runner can report "not built yet" when the modules are missing.
"""

from __future__ import annotations

import os
from typing import Any

__all__ = ["NODE_ID", "build_app"]

NODE_ID = "bench"


async def _handle(event: Any) -> None:
    """A handler that does nothing, so the benchmark measures the node and the queue, not the work."""


def _logging_handler(path: str) -> Any:
    # O_APPEND writes reach the kernel at once: they survive a kill -9 of this process (no fsync needed for that).
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    async def handle(event: Any) -> None:
        os.write(fd, f"{event.event_id}\n".encode())

    return handle


async def build_app(store: str | None = None) -> Any:
    """Build the runtime and its transport app.

    Args:
        store: a SQLite file to keep events in (the durable node), or None for the memory store.

    Returns:
        The Starlette app returned by `create_transport_app`.

    Raises:
        ImportError: promptise_asgi.runtime or promptise_asgi.transport does not exist yet.
    """
    from promptise_asgi.runtime import AgentRuntime, ProcessConfig
    from promptise_asgi.transport import create_transport_app

    if store is None:
        runtime = AgentRuntime()
    else:
        from promptise_asgi.store import SQLiteStore

        runtime = AgentRuntime(store=SQLiteStore(store))
    log = os.environ.get("BENCH_HANDLED_LOG")
    await runtime.add_process("worker", ProcessConfig(handler=_logging_handler(log) if log else _handle))
    await runtime.add_process("idle", ProcessConfig())
    return create_transport_app(runtime, node_id=NODE_ID, manage_runtime=True)
