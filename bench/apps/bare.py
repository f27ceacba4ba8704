"""The ceiling: a raw ASGI callable, no framework, answering the node routes with fixed JSON bodies.

It returns the same bytes as our node for each GET route (the runner captures them from our node when it is built
and passes them in a file named by `BENCH_BODIES`; otherwise the bodies below, shaped as SPEC section 3 says), and
for `POST /processes/worker/event` it reads the whole body and answers 202 with a fresh event id. It knows nothing
about promptise_asgi: it is what any ASGI app costs on the same server, the upper bound for ours.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

__all__ = ["EVENT_PATH", "GET_PATHS", "app", "default_bodies", "make_app"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

GET_PATHS = ("/health", "/processes", "/status")
EVENT_PATH = "/processes/worker/event"


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


def _process_status(name: str, process_id: str, handled: int) -> dict[str, Any]:
    return {
        "name": name,
        "process_id": process_id,
        "state": "running",
        "queue_size": 0,
        "max_queue": 1000,
        "events_received": handled,
        "events_handled": handled,
        "events_failed": 0,
        "last_error": None,
        "last_event_id": None,
        "uptime_seconds": 12.5,
        "restart_count": 0,
        "triggers": [],
        "instructions": "",
        "model": None,
    }


def default_bodies(node_id: str = "bench") -> dict[str, bytes]:
    """The GET bodies for a node with two running processes, used until our node exists to copy from.

    Args:
        node_id: The node id the bodies name.

    Returns:
        Path -> response body bytes for every path in `GET_PATHS`.
    """
    ids = {"worker": "8f0c2a52-3c1e-4b7e-9a41-1f5d2b9c0e11", "idle": "0b6f7d3e-5a2c-4f19-8d7e-3c9a1e2f4b55"}
    processes = {name: _process_status(name, pid, 0) for name, pid in ids.items()}
    return {
        "/health": _dumps({"status": "healthy", "node_id": node_id, "process_count": len(ids)}),
        "/processes": _dumps(
            {
                "node_id": node_id,
                "processes": [{"name": n, "state": "running", "process_id": pid} for n, pid in ids.items()],
            }
        ),
        "/status": _dumps({"process_count": len(ids), "processes": processes, "node_id": node_id}),
    }


def _load_bodies() -> dict[str, bytes]:
    bodies = default_bodies()
    path = os.environ.get("BENCH_BODIES")
    if path:
        with open(path, encoding="utf-8") as f:
            captured: dict[str, str] = json.load(f)
        bodies.update({route: body.encode() for route, body in captured.items()})
    return bodies


def make_app(bodies: dict[str, bytes]) -> ASGIApp:
    """Build the ceiling app over fixed GET bodies.

    Args:
        bodies: Path -> body bytes for the GET routes.

    Returns:
        A raw ASGI callable.
    """
    json_type = (b"content-type", b"application/json")
    get_starts = {
        path: {
            "type": "http.response.start",
            "status": 200,
            "headers": [json_type, (b"content-length", str(len(body)).encode())],
        }
        for path, body in bodies.items()
    }
    get_bodies = {path: {"type": "http.response.body", "body": body} for path, body in bodies.items()}
    not_found = b'{"error":"Not Found"}'
    event_prefix = b'{"status":"injected","event_id":"'
    event_suffix = b'","process":"worker"}'
    event_length = str(len(event_prefix) + 36 + len(event_suffix)).encode()

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            path = scope["path"]
            method = scope["method"]
            if method == "GET" and path in get_starts:
                await send(get_starts[path])
                await send(get_bodies[path])
                return
            if method == "POST" and path == EVENT_PATH:
                more = True
                while more:
                    message = await receive()
                    more = message.get("more_body", False)
                await send(
                    {
                        "type": "http.response.start",
                        "status": 202,
                        "headers": [json_type, (b"content-length", event_length)],
                    }
                )
                body = event_prefix + str(uuid.uuid4()).encode() + event_suffix
                await send({"type": "http.response.body", "body": body})
                return
            await send(
                {
                    "type": "http.response.start",
                    "status": 404,
                    "headers": [json_type, (b"content-length", str(len(not_found)).encode())],
                }
            )
            await send({"type": "http.response.body", "body": not_found})
        elif kind == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return

    return app


app = make_app(_load_bodies())
