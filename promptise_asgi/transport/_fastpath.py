"""The node app's fast path: exact-match dispatch for the API routes, derived from the one route table.

A profile showed Starlette's generic middleware and routing stack costing several times what the endpoint
itself does on `GET /health` or `POST /processes/{name}/event`. `TransportApp` calls those endpoints directly,
through the same guard and the same exception-to-answer mapping. The dispatch tables are built from the
app's own `Route`s, so the fast path cannot know a route the router does not, or send a request elsewhere.
Everything it does not match exactly (HEAD, 404, 405, parameters it does not know, lifespan) takes the full
Starlette path, and so does every request once the user adds middleware or exception handlers.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route
from starlette.types import Receive, Scope, Send

from .._http import EXPECTED_FAILURES, RequestGuard, RequestLog, response_for_exception, route_path
from ._endpoints import NodeState, health

__all__ = ["DispatchTable", "TransportApp"]

logger = logging.getLogger("promptise_asgi.transport")

Endpoint = Callable[[Request], Awaitable[Response]]

_PROCESS_PREFIX = "/processes/{name}/"


class DispatchTable:
    """(method, path) -> endpoint for parameterless routes, and (method, action) for `/processes/{name}/<action>`.

    Built from routes; other parameterised routes are left to the router.
    """

    def __init__(self, routes: Sequence[BaseRoute]) -> None:
        self.exact: dict[tuple[str, str], Endpoint] = {}
        self.process_actions: dict[tuple[str, str], Endpoint] = {}
        for route in routes:
            if not isinstance(route, Route) or not route.methods:
                continue
            path = route.path
            if "{" not in path:
                table, key = self.exact, path
            elif path.startswith(_PROCESS_PREFIX) and "{" not in path[len(_PROCESS_PREFIX) :]:
                table, key = self.process_actions, path[len(_PROCESS_PREFIX) :]
            else:
                continue
            for method in route.methods - {"HEAD"}:  # HEAD is Starlette's to answer (no body)
                table[(method, key)] = route.endpoint

    def match(self, scope: Scope) -> Endpoint | None:
        """The endpoint for this request, setting its `path_params`; None when the router must decide."""
        path = route_path(scope) if scope.get("root_path") else scope["path"]
        if scope.get("root_path") and not scope["path"].startswith(scope["root_path"]):
            return None
        method: str = scope["method"]
        endpoint = self.exact.get((method, path))
        if endpoint is not None or not path.startswith("/processes/"):
            return endpoint
        name, _, action = path[len("/processes/") :].rpartition("/")
        endpoint = self.process_actions.get((method, action))
        if endpoint is None or not name or "/" in name:
            return None
        scope["path_params"] = {"name": name}
        return endpoint


class TransportApp(Starlette):
    """The node app: a Starlette app whose API routes skip the generic middleware and routing stack."""

    def __init__(self, *, node: NodeState, guard: RequestGuard, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.state.node = node
        self._guard = guard
        self._request_log = RequestLog(guard)
        self._table = DispatchTable(self.router.routes)
        self._direct = True

    def add_middleware(self, middleware_class: Any, *args: Any, **kwargs: Any) -> None:
        # Middleware a user adds must see every request: from then on, every request takes the full stack.
        self._direct = False
        super().add_middleware(middleware_class, *args, **kwargs)

    def add_exception_handler(self, exc_class_or_status_code: Any, handler: Any) -> None:
        self._direct = False
        super().add_exception_handler(exc_class_or_status_code, handler)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            await self._request_log(scope, receive, send, self._dispatch)
        else:
            await super().__call__(scope, receive, send)

    async def _dispatch(self, scope: Scope, receive: Receive, send: Send) -> None:
        endpoint = self._table.match(scope) if self._direct else None
        if endpoint is None:
            await super().__call__(scope, receive, send)
            return
        scope["app"] = self
        refusal = self._guard.refusal(scope)
        if refusal is not None:
            await refusal(scope, receive, send)
            return
        if endpoint is health:
            start, body = self.state.node.health_messages()
            await send(start)
            await send(body)
            return
        try:
            response = await endpoint(Request(scope, receive, send))
        except ClientDisconnect:
            return  # nobody is left to answer
        except Exception as exc:
            if not isinstance(exc, EXPECTED_FAILURES):  # answers, not bugs: no traceback
                logger.exception("%s %s failed", scope["method"], scope["path"])
            response = response_for_exception(exc)
        await response(scope, receive, send)
