"""Serve a real promptise AgentRuntime over HTTP with promptise-asgi, mounted in a Starlette app.

Needs `pip install promptise-asgi 'promptise==1.10.*'`. Serve it with
`uvicorn examples.promptise_mount:app`, or run this file to drive it in-process (no network, no API key:
the process answers with promptise's ScriptedModel).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
import httpx
from promptise.runtime import AgentRuntime, ProcessConfig, RuntimeConfig
from promptise.testing import ScriptedModel
from starlette.applications import Starlette
from starlette.routing import Mount

from promptise_asgi.transport import create_transport_app, node_lifespan

model = ScriptedModel(["Ticket triaged."], on_exhausted="repeat_last")
runtime = AgentRuntime(
    RuntimeConfig(processes={"triage": ProcessConfig(model=model, instructions="You triage incoming support tickets.")})
)
node = create_transport_app(runtime, node_id="node-1")


@asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[None]:
    # A mounted app gets no lifespan events: the host app starts the runtime and stops it at shutdown.
    async with node_lifespan(node):
        yield


app = Starlette(routes=[Mount("/runtime", app=node)], lifespan=lifespan)


async def main() -> None:
    transport = httpx.ASGITransport(app=app)
    # `async with lifespan(app)` does here what uvicorn does at startup and shutdown.
    async with lifespan(app), httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1/runtime") as client:
        print((await client.get("/processes")).json())
        reply = await client.post("/processes/triage/event", json={"payload": {"ticket": 4711}})
        print(reply.status_code, reply.json())
        with anyio.fail_after(30):
            status = (await client.get("/processes/triage/status")).json()
            while status["invocation_count"] == 0:
                await anyio.sleep(0.05)
                status = (await client.get("/processes/triage/status")).json()
        print("handled by the agent:", model.calls[-1].messages[-1].content.splitlines()[0])


if __name__ == "__main__":
    anyio.run(main)
