"""HTTP plumbing shared by the node app and the coordinator app: JSON answers, the one exception-to-answer
mapping, bounded body reading and the request guard. Knows Starlette, not the runtime or the coordinator."""

from __future__ import annotations

from ._bodies import EventBody, parse_event_body, read_json_object
from ._guard import CONTROL, NODE, ONLY_CONTROL, PROBE_PATHS, RequestGuard, ScopeRule, Scopes, route_path
from ._responses import (
    EXPECTED_FAILURES,
    JSONResponse,
    dumps,
    error_response,
    exception_handlers,
    response_for_exception,
)

__all__ = [
    "CONTROL",
    "EXPECTED_FAILURES",
    "NODE",
    "ONLY_CONTROL",
    "PROBE_PATHS",
    "EventBody",
    "JSONResponse",
    "RequestGuard",
    "ScopeRule",
    "Scopes",
    "dumps",
    "error_response",
    "exception_handlers",
    "parse_event_body",
    "read_json_object",
    "response_for_exception",
    "route_path",
]
