"""promptise-asgi: run, discover and steer distributed agent processes over HTTP.

Everything public is importable from here as well as from its own module (SPEC section 1).
`app` is the node that `uvicorn promptise_asgi:app` serves, built from the environment at startup.
"""

from __future__ import annotations

__version__ = "0.1.0"

from ._app import app
from .runtime import (
    AgentProcess,
    AgentRuntime,
    ProcessConfig,
    ProcessState,
    TriggerConfig,
    TriggerEvent,
)
from .transport import RuntimeTransport, create_transport_app, node_lifespan

__all__ = [
    "AgentProcess",
    "AgentRuntime",
    "ProcessConfig",
    "ProcessState",
    "RuntimeTransport",
    "TriggerConfig",
    "TriggerEvent",
    "__version__",
    "app",
    "create_transport_app",
    "node_lifespan",
]
