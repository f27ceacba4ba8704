"""HTTP plumbing shared by the node app and the coordinator app: JSON answers, the one exception-to-answer
mapping, bounded body reading and the request guard. Knows Starlette, not the runtime or the coordinator."""

from __future__ import annotations

from ._audit import RequestLog, audit_logger
from ._bodies import EventBody, parse_event_body, read_json_object
from ._guard import (
    CONTROL,
    NODE,
    ONLY_CONTROL,
    PROBE_PATHS,
    READ,
    RequestGuard,
    ScopeRule,
    Scopes,
    route_path,
    scoped_tokens,
    token_fingerprint,
)
from ._responses import (
    EXPECTED_FAILURES,
    JSONResponse,
    dumps,
    error_response,
    exception_handlers,
    response_for_exception,
)
from ._sse import DEFAULT_PING_INTERVAL, encode_change, event_stream, requested_last_event_id

__all__ = [
    "CONTROL",
    "DEFAULT_PING_INTERVAL",
    "EXPECTED_FAILURES",
    "NODE",
    "ONLY_CONTROL",
    "PROBE_PATHS",
    "READ",
    "EventBody",
    "JSONResponse",
    "RequestGuard",
    "RequestLog",
    "ScopeRule",
    "Scopes",
    "audit_logger",
    "dumps",
    "encode_change",
    "error_response",
    "event_stream",
    "exception_handlers",
    "parse_event_body",
    "read_json_object",
    "requested_last_event_id",
    "response_for_exception",
    "route_path",
    "scoped_tokens",
    "token_fingerprint",
]
