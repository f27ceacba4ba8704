"""The OpenAPI 3.1 document of the node API (SPEC section 3), built once per mount prefix.

Written by hand because the routes are plain Starlette endpoints; `tests/test_transport.py` checks that
every route of the app appears here and schemathesis checks the answers against it.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from .._version import __version__ as _version

__all__ = ["MAX_DEAD_LETTER_LIMIT", "node_openapi"]

# The most dead letters one `GET /processes/{name}/dead-letters` lists.
MAX_DEAD_LETTER_LIMIT = 10_000

_ERROR = {"$ref": "#/components/schemas/Error"}
_OBJECT: dict[str, Any] = {"type": "object"}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _errors(*codes: int) -> dict[str, Any]:
    descriptions = {
        400: "Bad request body, header or parameter",
        401: "Missing or wrong bearer token",
        403: "No token configured: a remote peer or a cross-origin request refused",
        404: "Unknown process (or dead letter)",
        409: "An event with this id is queued already",
        413: "Body larger than max_body_bytes",
        421: "Non-loopback Host (no token configured)",
        422: "Idempotency-Key already used with a different body",
        429: "Process queue full; see Retry-After",
        500: "Unexpected failure",
        501: "The process's runtime has no event store (dead letters, idempotency keys)",
        503: "Not ready, or the event store failed",
    }
    return {str(code): _json(_ERROR, descriptions[code]) for code in codes}


_NAME = {
    "name": "name",
    "in": "path",
    "required": True,
    "description": "Process name (percent-encoded).",
    "schema": {"type": "string", "minLength": 1},
}
_EVENT_ID = {
    "name": "event_id",
    "in": "path",
    "required": True,
    "description": "The dead letter's event id.",
    "schema": {"type": "string", "minLength": 1},
}
_IDEMPOTENCY_KEY = {
    "name": "Idempotency-Key",
    "in": "header",
    "required": False,
    "description": (
        "Accept this event once: a key this process accepted within its idempotency_ttl answers the first "
        "event's 202 (with Idempotent-Replayed: true) and queues nothing; with another body it is 422."
    ),
    "schema": {"type": "string", "minLength": 1, "maxLength": 255, "pattern": "^[\\x20-\\x7E]+$"},
}
_LIMIT = {
    "name": "limit",
    "in": "query",
    "required": False,
    "description": "How many of the newest dead letters to list (oldest first).",
    "schema": {"type": "integer", "minimum": 1, "maximum": MAX_DEAD_LETTER_LIMIT, "default": 100},
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


def _dead_letter_answer(status: str) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": {"status": {"const": status}, "event_id": {"type": "string"}, "process": {"type": "string"}},
        "required": ["status", "event_id", "process"],
    }


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
    inject = _operation(
        "injectEvent", "Inject an event", "202", injected, 400, 404, 413, 422, 429, 501, 503, params=True
    )
    inject["requestBody"] = event_body
    inject["parameters"] = [_NAME, _IDEMPOTENCY_KEY]
    inject["responses"]["202"]["headers"] = {
        "Idempotent-Replayed": {
            "description": "`true` when this answer repeats the one given to an earlier request with the same key.",
            "schema": {"type": "string", "enum": ["true"]},
        }
    }
    dead_letter_list = {
        "type": "object",
        "properties": {
            "process": {"type": "string"},
            "dead_letters": {"type": "array", "items": {"$ref": "#/components/schemas/DeadLetter"}},
        },
        "required": ["process", "dead_letters"],
    }
    list_dead = _operation("listDeadLetters", "List a process's dead letters", "200", dead_letter_list, 400, 404, 501)
    list_dead["parameters"] = [_NAME, _LIMIT]
    requeued = _dead_letter_answer("queued")
    retry_dead = _operation("retryDeadLetter", "Queue a dead letter again", "202", requeued, 404, 409, 429, 501, 503)
    retry_dead["parameters"] = [_NAME, _EVENT_ID]
    delete_dead = _operation(
        "deleteDeadLetter", "Delete a dead letter", "200", _dead_letter_answer("deleted"), 404, 501
    )
    delete_dead["parameters"] = [_NAME, _EVENT_ID]
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
            "/processes/{name}/dead-letters": {"get": list_dead},
            "/processes/{name}/dead-letters/{event_id}/retry": {"post": retry_dead},
            "/processes/{name}/dead-letters/{event_id}": {"delete": delete_dead},
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
                "DeadLetter": {
                    "type": "object",
                    "properties": {
                        "event_id": {"type": "string"},
                        "event": {"type": "object"},
                        "attempts": {"type": "integer", "minimum": 0},
                        "reason": {"enum": ["error", "interrupted"]},
                        "error": {"type": ["string", "null"]},
                        "dead_at": {"type": "string"},
                    },
                    "required": ["event_id", "event", "attempts", "reason", "error", "dead_at"],
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
