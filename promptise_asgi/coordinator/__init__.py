"""The coordinator: one view of every node's health, and remote control of their processes.

`RuntimeCoordinator` is the core (no HTTP server); `create_coordinator_app` serves it over HTTP, with the
registry nodes join. Runs on asyncio and trio.
"""

from __future__ import annotations

from ._app import create_coordinator_app
from ._core import NodeInfo, RuntimeCoordinator

__all__ = ["NodeInfo", "RuntimeCoordinator", "create_coordinator_app"]
