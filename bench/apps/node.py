"""Our node for the HTTP benchmark: the built-in runtime with two processes behind `create_transport_app`.

Process `worker` has a trivial async handler (it is the target of `POST /processes/worker/event`), process `idle`
has none. The app owns the runtime (`manage_runtime=True`), so uvicorn's lifespan starts and stops it, exactly as
`uvicorn promptise_asgi:app` would. Importing this module does not import promptise_asgi: `build_app` does, so
the runner can report "not built yet" when the modules are missing.
"""

from __future__ import annotations

from typing import Any

__all__ = ["NODE_ID", "build_app"]

NODE_ID = "bench"


async def _handle(event: Any) -> None:
    """A handler that does nothing, so the benchmark measures the node and the queue, not the work."""


async def build_app() -> Any:
    """Build the runtime and its transport app.

    Returns:
        The Starlette app returned by `create_transport_app`.

    Raises:
        ImportError: promptise_asgi.runtime or promptise_asgi.transport does not exist yet.
    """
    from promptise_asgi.runtime import AgentRuntime, ProcessConfig
    from promptise_asgi.transport import create_transport_app

    runtime = AgentRuntime()
    await runtime.add_process("worker", ProcessConfig(handler=_handle))
    await runtime.add_process("idle", ProcessConfig())
    return create_transport_app(runtime, node_id=NODE_ID, manage_runtime=True)
