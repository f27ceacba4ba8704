"""Reading request bodies: a JSON object read with a size limit while streaming, and the event body's fields."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request

__all__ = ["EventBody", "parse_event_body", "read_json_object"]


async def read_json_object(request: Request, max_bytes: int, *, allow_empty: bool = False) -> dict[str, Any]:
    """Read the request body as a JSON object, refusing more than `max_bytes` while streaming.

    With `allow_empty`, an empty body reads as `{}` (a body that may be left out, like a heartbeat's digest).

    Raises:
        HTTPException: 413 past the limit, 400 for a body that is not JSON or not an object.
    """
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise HTTPException(413, f"Body larger than {max_bytes} bytes")
    # Read the ASGI messages directly: cheaper than Request.stream() on the hot event path, and it stops at
    # the first chunk past the limit instead of reading the rest.
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await request.receive()
        if message["type"] != "http.request":
            raise ClientDisconnect()
        chunk: bytes = message.get("body", b"")
        size += len(chunk)
        if size > max_bytes:
            raise HTTPException(413, f"Body larger than {max_bytes} bytes")
        chunks.append(chunk)
        if not message.get("more_body", False):
            break
    if allow_empty and not size:
        return {}
    try:
        data = orjson.loads(b"".join(chunks))
    except orjson.JSONDecodeError:  # also raised for bytes that are not UTF-8
        raise HTTPException(400, "Invalid JSON body") from None
    if not isinstance(data, dict):
        raise HTTPException(400, "Body must be a JSON object")
    return data


@dataclass(frozen=True, slots=True)
class EventBody:
    """The fields of an event body (SPEC 3), validated, with their defaults filled in."""

    trigger_id: str
    trigger_type: str
    payload: dict[str, Any]
    metadata: dict[str, Any]


def parse_event_body(body: dict[str, Any]) -> EventBody:
    """Validate an event body in the SPEC's order: payload, metadata, then the trigger fields.

    Every key is optional: `payload`/`metadata` default to `{}`, `trigger_id`/`trigger_type` to `"remote"`
    (also when empty); numbers and booleans given as trigger fields become text.

    Raises:
        HTTPException: 400 naming the field that is not a JSON object (or not text).
    """
    payload = _object_field(body, "payload")
    metadata = _object_field(body, "metadata")
    return EventBody(_text_field(body, "trigger_id"), _text_field(body, "trigger_type"), payload, metadata)


def _object_field(body: dict[str, Any], key: str) -> dict[str, Any]:
    value = body.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise HTTPException(400, f"{key} must be a JSON object")
    return value


def _text_field(body: dict[str, Any], key: str) -> str:
    value = body.get(key)
    if value is None or value == "":
        return "remote"
    if isinstance(value, dict | list):
        raise HTTPException(400, f"{key} must be a string")
    return str(value)
