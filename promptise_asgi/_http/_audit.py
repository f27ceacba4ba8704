"""Request ids and the audit log, around a whole app (SPEC 15).

Every response carries `X-Request-ID` (the client's, when it is valid, else a new one), and the id is the
current request's for the calls made while serving it (the coordinator forwards it to nodes). Every request
that can change state (any method but GET and HEAD, heartbeats aside: too frequent) writes one record on the
logger `promptise_asgi.audit`, refusals included: time, request id, client address, method, path, status,
scope (`control`, `node`, `read` or `open`) and the fingerprint of the token presented, never the token.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .._request_id import CURRENT_REQUEST_ID, accepted_request_id, new_request_id
from ._guard import RequestGuard, route_path

__all__ = ["RequestLog", "audit_logger"]

audit_logger = logging.getLogger("promptise_asgi.audit")

_UNAUDITED_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


class RequestLog:
    """Gives each HTTP request its id and audits the ones that can change state.

    Args:
        guard: the app's guard, which says what scope and token a request presented.
    """

    def __init__(self, guard: RequestGuard) -> None:
        self.guard = guard

    def wrap(self, app: ASGIApp) -> ASGIApp:
        """Return `app` with request ids and the audit log (for `Middleware(request_log.wrap)`)."""

        async def logged(scope: Scope, receive: Receive, send: Send) -> None:
            await self(scope, receive, send, app)

        return logged

    async def __call__(
        self, scope: Scope, receive: Receive, send: Send, app: Callable[[Scope, Receive, Send], Awaitable[None]]
    ) -> None:
        if scope["type"] != "http":
            await app(scope, receive, send)
            return
        incoming = None
        for key, value in scope["headers"]:
            if key == b"x-request-id":
                incoming = value
                break
        request_id = accepted_request_id(incoming) or new_request_id()
        header = (b"x-request-id", request_id.encode())
        status = 0

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message = {**message, "headers": [*message.get("headers", ()), header]}
            await send(message)

        reset = CURRENT_REQUEST_ID.set(request_id)
        try:
            await app(scope, receive, send_with_id)
        finally:
            CURRENT_REQUEST_ID.reset(reset)
            if scope["method"] not in _UNAUDITED_METHODS and audit_logger.isEnabledFor(logging.INFO):
                self._audit(scope, request_id, status)

    def _audit(self, scope: Scope, request_id: str, status: int) -> None:
        path = route_path(scope)
        if path.endswith("/heartbeat"):
            return
        kind, fingerprint = self.guard.classify(scope)
        client = scope.get("client")
        record = {
            "time": datetime.now(UTC).isoformat(timespec="milliseconds"),
            "request_id": request_id,
            "client": f"{client[0]}:{client[1]}" if client else None,
            "method": scope["method"],
            "path": scope.get("root_path", "") + path,
            "status": status,
            "scope": kind,
            "token": fingerprint,
        }
        audit_logger.info(" ".join(f"{key}={value}" for key, value in record.items()), extra={"audit": record})
