"""Serving ASGI apps in-process: `AppServer` over uvicorn or hypercorn, with the limits of SPEC 18.

Knows servers, sockets and ASGI messages; not the apps it serves.
"""

from __future__ import annotations

from ._limits import ServerLimits
from ._runner import AppServer, ServerName, reachable_host

__all__ = ["AppServer", "ServerLimits", "ServerName", "reachable_host"]
