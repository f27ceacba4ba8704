"""The node's endpoints (SPEC section 3) and the one table of its routes.

The runtime is known only through the Protocols in `_shape` and the adapters in `_promptise`; nothing here
knows which server runs the app, how it is dispatched, or how nodes are discovered.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from typing import Any, Literal

import orjson
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from .._http import JSONResponse, dumps, error_response, event_stream, parse_event_body, read_json_object
from .._validation import check_idempotency_key
from . import _promptise as promptise
from ._changes import NodeChanges
from ._metrics import metrics_endpoint
from ._openapi import MAX_DEAD_LETTER_LIMIT, node_openapi
from ._shape import RuntimeLike, StoreProcess

__all__ = ["NodeState", "Phase", "api_routes"]

logger = logging.getLogger("promptise_asgi.transport")

Phase = Literal["starting", "ready", "draining", "stopped"]


@dataclass(eq=False)
class NodeState:
    """What the endpoints of one node app share: its runtime, its id, its settings, its lifecycle phase and its
    change stream."""

    runtime: RuntimeLike
    node_id: str
    max_body_bytes: int
    retry_after: int
    secured: bool
    ping_interval: float = 15.0
    phase: Phase = "starting"
    registration: Any = None  # a SelfRegistration, when the node keeps itself registered
    _health: tuple[int, bytes, dict[str, Any], dict[str, Any]] | None = None
    changes: NodeChanges = field(init=False)

    def __post_init__(self) -> None:
        self.changes = NodeChanges(self.runtime, self.status)

    def status(self) -> dict[str, Any]:
        """The `/status` body (also the data of a change stream's snapshot), with the node's registration
        trouble or health when it keeps itself registered."""
        body = {**self.runtime.status(), "node_id": self.node_id}
        if self.registration is not None:
            body["registration"] = self.registration.status()
        return body

    def set_phase(self, phase: Phase) -> None:
        """Move to a lifecycle phase (`/readyz` follows it) and tell the change stream."""
        if phase != self.phase:
            self.phase = phase
            self.changes.publish("node.phase", {"phase": phase})

    def health_body(self) -> bytes:
        """The body of `GET /health`, rebuilt only when the process count changes."""
        return self._health_cache()[1]

    def health_messages(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """The ASGI messages answering `GET /health`, from the same body.

        Load balancers and orchestrators hit `/health` more than anything else; answering it from two
        prepared messages costs what a bare ASGI app costs.
        """
        cached = self._health_cache()
        return cached[2], cached[3]

    def _health_cache(self) -> tuple[int, bytes, dict[str, Any], dict[str, Any]]:
        count = len(self.runtime.processes)
        cached = self._health
        if cached is None or cached[0] != count:
            body = dumps({"status": "healthy", "node_id": self.node_id, "process_count": count})
            start = {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))],
            }
            cached = self._health = (count, body, start, {"type": "http.response.body", "body": body})
        return cached

    def process(self, name: str) -> Any:
        if name not in self.runtime.processes:
            raise HTTPException(404, f"Process '{name}' not found")
        return self.runtime.get_process(name)


def _node(request: Request) -> NodeState:
    node: NodeState = request.scope["app"].state.node
    return node


async def health(request: Request) -> Response:
    return Response(_node(request).health_body(), media_type="application/json")


async def livez(request: Request) -> Response:
    return JSONResponse({"status": "alive"})


async def readyz(request: Request) -> Response:
    node = _node(request)
    if node.phase == "ready":
        return JSONResponse({"status": "ready", "node_id": node.node_id})
    return JSONResponse({"error": f"Node is not ready ({node.phase})", "status": node.phase}, status_code=503)


async def status(request: Request) -> Response:
    return JSONResponse(_node(request).status())


async def changes(request: Request) -> Response:
    node = _node(request)
    return event_stream(node.changes.hub, request, ping_interval=node.ping_interval)


async def list_processes(request: Request) -> Response:
    node = _node(request)
    processes = [
        {"name": name, "state": promptise.state_name(process), "process_id": process.process_id}
        for name, process in node.runtime.processes.items()
    ]
    return JSONResponse({"node_id": node.node_id, "processes": processes})


async def process_status(request: Request) -> Response:
    return JSONResponse(_node(request).process(request.path_params["name"]).status())


async def start_process(request: Request) -> Response:
    node, name = _node(request), request.path_params["name"]
    node.process(name)
    changed = await _lifecycle("start", promptise.start_process(node.runtime, name), name)
    return JSONResponse({"status": "started", "name": name, "changed": changed})


async def stop_process(request: Request) -> Response:
    node, name = _node(request), request.path_params["name"]
    node.process(name)
    changed = await _lifecycle("stop", promptise.stop_process(node.runtime, name), name)
    return JSONResponse({"status": "stopped", "name": name, "changed": changed})


async def restart_process(request: Request) -> Response:
    node, name = _node(request), request.path_params["name"]
    node.process(name)
    await _lifecycle("restart", promptise.restart_process(node.runtime, name), name)
    return JSONResponse({"status": "restarted", "name": name})


async def _lifecycle(action: str, operation: Any, name: str) -> Any:
    # A process that fails to start (a bad handler, a model it cannot build) is a server-side fault the
    # operator must see: answer 500 with the runtime's own message rather than a bare "Internal error".
    try:
        return await operation
    except Exception as exc:
        logger.warning("%s of process %r failed: %s", action, name, exc)
        raise HTTPException(500, f"Failed to {action} process '{name}': {exc}") from exc


async def inject_event(request: Request) -> Response:
    node, name = _node(request), request.path_params["name"]
    process = node.process(name)
    key = _idempotency_key(request)
    body = await read_json_object(request, node.max_body_bytes)
    fields = parse_event_body(body)
    event = promptise.make_event(
        process,
        trigger_id=fields.trigger_id,
        trigger_type=fields.trigger_type,
        payload=fields.payload,
        metadata=fields.metadata,
    )
    event_id = promptise.event_id_of(event)
    try:
        if key is None:
            await promptise.inject(process, event)
        else:
            # The same key with the same body (as parsed JSON, key order aside) answers the first event's id.
            fingerprint = hashlib.sha256(orjson.dumps(body, option=orjson.OPT_SORT_KEYS)).hexdigest()
            event_id = await _store_process(process, name, "Idempotency-Key").inject(
                event, idempotency_key=key, fingerprint=fingerprint
            )
    except Exception as exc:
        if promptise.queue_full_retry_after(exc) is None:
            raise
        return error_response(429, str(exc), {"Retry-After": str(node.retry_after)})
    replayed = event_id != promptise.event_id_of(event)
    return JSONResponse(
        {"status": "injected", "event_id": event_id, "process": name},
        status_code=202,
        headers={"Idempotent-Replayed": "true"} if replayed else None,
    )


def _idempotency_key(request: Request) -> str | None:
    for header, value in request.scope["headers"]:
        if header == b"idempotency-key":
            try:
                return check_idempotency_key(value.decode("latin-1"))
            except ValueError as exc:
                raise HTTPException(400, str(exc)) from None
    return None


def _store_process(process: Any, name: str, feature: str) -> StoreProcess:
    found = promptise.store_process(process)
    if found is None:
        raise HTTPException(
            501,
            f"{feature} needs the built-in runtime's event store; process '{name}' belongs to a runtime that keeps "
            "its own queue",
        )
    return found


async def list_dead_letters(request: Request) -> Response:
    node, name = _node(request), request.path_params["name"]
    process = _store_process(node.process(name), name, "Dead letters")
    text = request.query_params.get("limit", "100")
    limit = int(text) if text.isdigit() and len(text) <= 6 else 0
    if not 1 <= limit <= MAX_DEAD_LETTER_LIMIT:
        raise HTTPException(400, f"limit must be an integer from 1 to {MAX_DEAD_LETTER_LIMIT}")
    return JSONResponse({"process": name, "dead_letters": await process.list_dead_letters(limit)})


async def retry_dead_letter(request: Request) -> Response:
    node, name, event_id = _node(request), request.path_params["name"], request.path_params["event_id"]
    process = _store_process(node.process(name), name, "Dead letters")
    try:
        found = await process.retry_dead_letter(event_id)
    except ValueError as exc:  # an event with that id is queued already
        raise HTTPException(409, str(exc)) from None
    except Exception as exc:
        if promptise.queue_full_retry_after(exc) is None:
            raise
        return error_response(429, str(exc), {"Retry-After": str(node.retry_after)})
    if not found:
        raise HTTPException(404, f"Dead letter '{event_id}' not found in process '{name}'")
    return JSONResponse({"status": "queued", "event_id": event_id, "process": name}, status_code=202)


async def delete_dead_letter(request: Request) -> Response:
    node, name, event_id = _node(request), request.path_params["name"], request.path_params["event_id"]
    process = _store_process(node.process(name), name, "Dead letters")
    if not await process.delete_dead_letter(event_id):
        raise HTTPException(404, f"Dead letter '{event_id}' not found in process '{name}'")
    return JSONResponse({"status": "deleted", "event_id": event_id, "process": name})


async def openapi(request: Request) -> Response:
    node = _node(request)
    return JSONResponse(node_openapi(request.scope.get("root_path", ""), secured=node.secured))


def api_routes() -> list[Route]:
    """The node's routes: the one table both Starlette's router and the fast path dispatch from."""
    return [
        Route("/health", health, methods=["GET"]),
        Route("/livez", livez, methods=["GET"]),
        Route("/readyz", readyz, methods=["GET"]),
        Route("/status", status, methods=["GET"]),
        Route("/processes", list_processes, methods=["GET"]),
        Route("/changes", changes, methods=["GET"]),
        Route("/processes/{name}/status", process_status, methods=["GET"]),
        Route("/processes/{name}/start", start_process, methods=["POST"]),
        Route("/processes/{name}/stop", stop_process, methods=["POST"]),
        Route("/processes/{name}/restart", restart_process, methods=["POST"]),
        Route("/processes/{name}/event", inject_event, methods=["POST"]),
        Route("/processes/{name}/dead-letters", list_dead_letters, methods=["GET"]),
        Route("/processes/{name}/dead-letters/{event_id}/retry", retry_dead_letter, methods=["POST"]),
        Route("/processes/{name}/dead-letters/{event_id}", delete_dead_letter, methods=["DELETE"]),
        Route("/metrics", metrics_endpoint, methods=["GET"]),
        Route("/openapi.json", openapi, methods=["GET"]),
    ]
