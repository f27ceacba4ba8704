"""Mount a node inside an existing FastAPI app.

Run it:
    uvicorn examples.fastapi_mount:app --port 8000
then:
    curl localhost:8000/hello
    curl localhost:8000/runtime/processes
    curl -X POST localhost:8000/runtime/processes/greeter/event -H 'content-type: application/json' \\
         -d '{"payload": {"name": "Ada"}}'
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from promptise_asgi import AgentRuntime, ProcessConfig, TriggerConfig, TriggerEvent
from promptise_asgi.transport import create_transport_app, node_lifespan

logger = logging.getLogger("examples.fastapi_mount")


async def greet(event: TriggerEvent) -> None:
    logger.warning("hello, %s", event.payload.get("name", "world"))


runtime = AgentRuntime()
node = create_transport_app(runtime, node_id="api-node")


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    # Mounted apps get no lifespan events of their own, so the host app starts the node in its lifespan.
    await runtime.add_process("greeter", ProcessConfig(handler=greet, triggers=[TriggerConfig(type="event")]))
    async with node_lifespan(node):
        yield


app = FastAPI(lifespan=lifespan)
app.mount("/runtime", node)


@app.get("/hello")
async def hello() -> dict[str, str]:
    return {"hello": "world"}
