"""promptise-asgi: run, discover and steer distributed agent processes over HTTP.

Everything public is importable from here as well as from its own module (SPEC section 1).
`app` is the node that `uvicorn promptise_asgi:app` serves, built from the environment at startup.
"""

from __future__ import annotations

__version__ = "0.1.0"

from ._app import app
from ._errors import ConfigError, PromptiseASGIError, QueueFullError
from .client import (
    CoordinatorClient,
    CoordinatorError,
    CoordinatorTimeoutError,
    CoordinatorUnreachableError,
    NodeClient,
    NodeError,
    NodeTimeoutError,
    NodeUnreachableError,
)
from .coordinator import NodeInfo, RuntimeCoordinator, create_coordinator_app
from .discovery import (
    CoordinatorDiscovery,
    DiscoveredNode,
    NodeChange,
    ProcessDiscovery,
    RegistryDiscovery,
    StaticDiscovery,
)
from .etcd import EtcdDiscovery
from .runtime import AgentProcess, AgentRuntime, ProcessConfig, ProcessState, TriggerConfig, TriggerEvent
from .transport import AppServer, RuntimeTransport, create_transport_app, node_lifespan

__all__ = [
    "AgentProcess",
    "AgentRuntime",
    "AppServer",
    "ConfigError",
    "CoordinatorClient",
    "CoordinatorDiscovery",
    "CoordinatorError",
    "CoordinatorTimeoutError",
    "CoordinatorUnreachableError",
    "DiscoveredNode",
    "EtcdDiscovery",
    "NodeChange",
    "NodeClient",
    "NodeError",
    "NodeInfo",
    "NodeTimeoutError",
    "NodeUnreachableError",
    "ProcessConfig",
    "ProcessDiscovery",
    "ProcessState",
    "PromptiseASGIError",
    "QueueFullError",
    "RegistryDiscovery",
    "RuntimeCoordinator",
    "RuntimeTransport",
    "StaticDiscovery",
    "TriggerConfig",
    "TriggerEvent",
    "__version__",
    "app",
    "create_coordinator_app",
    "create_transport_app",
    "node_lifespan",
]
