"""The OpenAPI 3.1 document of the node API (SPEC section 3), built once per mount prefix.

Written by hand because the routes are plain Starlette endpoints; `tests/test_transport.py` checks that
every route of the app appears here and schemathesis checks the answers against it.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from .._version import __version__ as _version

__all__ = ["node_openapi"]

_ERROR = {"$ref": "#/components/schemas/Error"}
_OBJECT: dict[str, Any] = {"type": "object"}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _errors(*codes: int) -> dict[str, Any]:
    descriptions = {
        400: "Bad request body",
        401: "Missing or wrong bearer token",
        403: "No token configured: a remote peer or a cross-origin request refused",
        404: "Unknown process",
        413: "Body larger than max_body_bytes",
        421: "Non-loopback Host (no token configured)",
        429: "Process queue full; see Retry-After",
        500: "Unexpected failure",
        503: "Not ready",
    }
    return {str(code): _json(_ERROR, descriptions[code]) for code in codes}


_NAME = {
    "name": "name",
    "in": "path",
    "required": True,
    "description": "Process name (percent-encoded).",
    "schema": {"type": "string", "minLength": 1},
}
_GUARDED = (401, 403, 421, 500)


def _operation(
    op_id: str, summary: str, ok: str, schema: dict[str, Any], *errors: int, params: bool = False
) -> dict[str, Any]:
    operation: dict[str, Any] = {
        "operationId": op_id,
        "summary": summary,
        "responses": {ok: _json(schema, summary), **_errors(*sorted({*errors, *_GUARDED}))},
    }
    if params:
        operation["parameters"] = [_NAME]
    return operation


def _lifecycle(action: str, status: str, changed: bool) -> dict[str, Any]:
    properties: dict[str, Any] = {"status": {"const": status}, "name": {"type": "string"}}
    required = ["status", "name"]
    if changed:
        properties["changed"] = {"type": "boolean"}
        required.append("changed")
    schema = {"type": "object", "properties": properties, "required": required}
    return {"post": _operation(f"{action}Process", f"{action.capitalize()} a process", "200", schema, 404, params=True)}


@lru_cache(maxsize=64)
def _document(root_path: str) -> dict[str, Any]:
    health = {
        "type": "object",
        "properties": {
            "status": {"const": "healthy"},
            "node_id": {"type": "string"},
            "process_count": {"type": "integer", "minimum": 0},
        },
        "required": ["status", "node_id", "process_count"],
    }
    process_list = {
        "type": "object",
        "properties": {
            "node_id": {"type": "string"},
            "processes": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {
                        "name": {"type": "string"},
                        "state": {"type": "string"},
                        "process_id": {"type": "string"},
                    },
                    "required": ["name", "state", "process_id"],
                },
            },
        },
        "required": ["node_id", "processes"],
    }
    injected = {
        "type": "object",
        "properties": {
            "status": {"const": "injected"},
            "event_id": {"type": "string"},
            "process": {"type": "string"},
        },
        "required": ["status", "event_id", "process"],
    }
    event_body = {
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Event"}}},
        "required": False,
    }
    inject = _operation("injectEvent", "Inject an event", "202", injected, 400, 404, 413, 429, params=True)
    inject["requestBody"] = event_body
    probe = {"type": "object", "properties": {"status": {"type": "string"}}, "required": ["status"]}
    return {
        "openapi": "3.1.0",
        "info": {"title": "promptise-asgi node", "version": _version},
        "servers": [{"url": root_path or "/"}],
        "paths": {
            "/health": {"get": {**_operation("health", "Node health", "200", health), "security": []}},
            "/livez": {"get": {**_operation("livez", "Liveness probe", "200", probe), "security": []}},
            "/readyz": {"get": {**_operation("readyz", "Readiness probe", "200", probe, 503), "security": []}},
            "/status": {"get": _operation("status", "Runtime status", "200", _OBJECT)},
            "/processes": {"get": _operation("listProcesses", "List processes", "200", process_list)},
            "/processes/{name}/status": {
                "get": _operation("processStatus", "Process status", "200", _OBJECT, 404, params=True)
            },
            "/processes/{name}/start": _lifecycle("start", "started", changed=True),
            "/processes/{name}/stop": _lifecycle("stop", "stopped", changed=True),
            "/processes/{name}/restart": _lifecycle("restart", "restarted", changed=False),
            "/processes/{name}/event": {"post": inject},
            "/changes": {"get": _changes_operation()},
            "/metrics": {
                "get": {
                    "operationId": "metrics",
                    "summary": "Prometheus metrics",
                    "responses": {
                        "200": {
                            "description": "Prometheus text exposition",
                            "content": {"text/plain": {"schema": {"type": "string"}}},
                        },
                        **_errors(*_GUARDED),
                    },
                }
            },
        },
        "components": {
            "schemas": {
                "Error": {
                    "type": "object",
                    "properties": {"error": {"type": "string"}},
                    "required": ["error"],
                },
                "Event": {
                    "type": "object",
                    "properties": {
                        "trigger_id": {"type": "string"},
                        "trigger_type": {"type": "string"},
                        "payload": {"type": "object"},
                        "metadata": {"type": "object"},
                    },
                },
            },
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }


# The change stream's message types (SPEC 13), as the OpenAPI document describes them to a reader.
CHANGE_TYPES = {
    "snapshot": "the /status body; the first message of a fresh stream",
    "process.state": '{"name", "state", "previous"} on every state change',
    "process.counters": '{"name", "queue_size", "in_flight", "events_received", "events_handled", "events_failed"}'
    ", at most once per process per second, only when changed",
    "process.added": '{"name"}',
    "process.removed": '{"name"}',
    "node.phase": '{"phase"}: starting, ready, draining, stopped (the /readyz phases)',
    "process.dead_letter": '{"name", "event_id", "reason"}',
}


def _changes_operation() -> dict[str, Any]:
    types = "; ".join(f"`{name}` {what}" for name, what in CHANGE_TYPES.items())
    return {
        "operationId": "changes",
        "summary": "The node's changes as they happen (Server-Sent Events)",
        "description": (
            "A `text/event-stream` of messages with `id` (an integer that only grows), `event` and a JSON "
            f"`data` object. Types: {types}. A `: ping` comment every 15 s keeps proxies open. Resume with "
            "`Last-Event-ID` (or `?last_event_id=`): what came after it is replayed, or a fresh snapshot is "
            "sent when it is too old to replay. A reader that falls 1,024 messages behind is disconnected."
        ),
        "parameters": [
            {"name": "Last-Event-ID", "in": "header", "required": False, "schema": {"type": "integer"}},
            {"name": "last_event_id", "in": "query", "required": False, "schema": {"type": "integer"}},
        ],
        "responses": {
            "200": {
                "description": "The change stream",
                "content": {"text/event-stream": {"schema": {"type": "string"}}},
            },
            **_errors(*_GUARDED, 503),
        },
    }


def node_openapi(root_path: str, *, secured: bool) -> dict[str, Any]:
    """Return the OpenAPI document for a node app mounted at `root_path` ("" at the root).

    Args:
        root_path: the ASGI `root_path` the app is served under; it becomes the server URL.
        secured: whether the node requires a bearer token (adds the security requirement).
    """
    document = _document(root_path)
    if secured:
        return {**document, "security": [{"bearer": []}]}
    return document
