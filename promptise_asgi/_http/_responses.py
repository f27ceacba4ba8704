"""JSON answers and the one mapping from an exception to the `{"error": ...}` answer a client gets.

Used by the node app (both its fast path and its Starlette routes) and by the coordinator app. Knows
Starlette and the package's exceptions, nothing of the runtime.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ExceptionHandler

from .._errors import (
    ClusterFullError,
    DiscoveryUnavailableError,
    EventStoreError,
    IdempotencyKeyConflictError,
    NodeConflictError,
    NodeError,
    NodeTimeoutError,
    NodeUnreachableError,
)

__all__ = [
    "EXPECTED_FAILURES",
    "JSONResponse",
    "dumps",
    "error_response",
    "exception_handlers",
    "response_for_exception",
]

_ORJSON_OPTIONS = orjson.OPT_NON_STR_KEYS


def dumps(content: Any) -> bytes:
    """Encode `content` as compact UTF-8 JSON (orjson: several times faster than `json` on every answer).

    NaN and infinities become `null`; objects JSON does not know (a foreign runtime's status may hold some)
    are written as their `str()` rather than failing the whole answer.
    """
    return orjson.dumps(content, default=str, option=_ORJSON_OPTIONS)


class JSONResponse(Response):
    """A compact JSON response (`application/json`)."""

    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return dumps(content)


def error_response(status_code: int, message: str, headers: Mapping[str, str] | None = None) -> JSONResponse:
    """Return the error body every route uses: `{"error": message}`."""
    return JSONResponse({"error": message}, status_code=status_code, headers=headers)


# The coordinator's and the event store's refusals, as the status each one answers with.
_REFUSALS: dict[type[Exception], int] = {
    NodeConflictError: 409,
    ClusterFullError: 503,
    DiscoveryUnavailableError: 503,
    IdempotencyKeyConflictError: 422,
    EventStoreError: 503,
}


def response_for_exception(exc: Exception) -> Response:
    """The one mapping from an exception raised while serving to the JSON answer the client gets.

    An `HTTPException` keeps its status, message and headers; a node's refusal passes through with its status
    (and `X-Node-Status`), an unreachable node is 502 and a silent one 504; the coordinator's refusals have
    their own status; anything else is a bare 500: the client learns that something failed, never how (the
    server log has the traceback).
    """
    if isinstance(exc, HTTPException):
        return error_response(exc.status_code, str(exc.detail), exc.headers)
    if isinstance(exc, NodeError):
        return error_response(exc.status_code, exc.message, {"X-Node-Status": str(exc.status_code)})
    if isinstance(exc, NodeUnreachableError):
        return error_response(504 if isinstance(exc, NodeTimeoutError) else 502, str(exc))
    status = _REFUSALS.get(type(exc))
    if status is not None:
        return error_response(status, str(exc))
    return error_response(500, "Internal server error")


async def _handle(request: Request, exc: Exception) -> Response:
    return response_for_exception(exc)


# Failures that are answers, not bugs: handled where they are raised, without a traceback in the log.
EXPECTED_FAILURES = (HTTPException, NodeError, NodeUnreachableError, *_REFUSALS)


def exception_handlers() -> dict[Any, ExceptionHandler]:
    """Starlette exception handlers that turn every failure into a JSON error body, as `response_for_exception`.

    An unexpected exception is answered too and then re-raised by Starlette, so the server logs its traceback.
    """
    handlers: dict[Any, ExceptionHandler] = {expected: _handle for expected in EXPECTED_FAILURES}
    handlers[Exception] = _handle
    return handlers
