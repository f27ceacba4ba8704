"""promptise-asgi: run, discover and steer distributed agent processes over HTTP.

Everything public is importable from here as well as from its own module (SPEC section 1), loaded on first
use, so that `import promptise_asgi` (which importing any submodule, the command line included, runs first)
stays cheap: the command line owns Ctrl-C a moment after it starts, not after the whole web stack loaded.
`app` is the node that `uvicorn promptise_asgi:app` serves, built from the environment at startup; it is a
real attribute (servers look it up in the module's namespace), and its module loads the web stack only then.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

from ._app import app

if TYPE_CHECKING:
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

# Public name -> the module that defines it, imported on first use.
_EXPORTS: dict[str, str] = {
    "AgentProcess": ".runtime",
    "AgentRuntime": ".runtime",
    "AppServer": ".transport",
    "ConfigError": "._errors",
    "CoordinatorClient": ".client",
    "CoordinatorDiscovery": ".discovery",
    "CoordinatorError": ".client",
    "CoordinatorTimeoutError": ".client",
    "CoordinatorUnreachableError": ".client",
    "DiscoveredNode": ".discovery",
    "EtcdDiscovery": ".etcd",
    "NodeChange": ".discovery",
    "NodeClient": ".client",
    "NodeError": ".client",
    "NodeInfo": ".coordinator",
    "NodeTimeoutError": ".client",
    "NodeUnreachableError": ".client",
    "ProcessConfig": ".runtime",
    "ProcessDiscovery": ".discovery",
    "ProcessState": ".runtime",
    "PromptiseASGIError": "._errors",
    "QueueFullError": "._errors",
    "RegistryDiscovery": ".discovery",
    "RuntimeCoordinator": ".coordinator",
    "RuntimeTransport": ".transport",
    "StaticDiscovery": ".discovery",
    "TriggerConfig": ".runtime",
    "TriggerEvent": ".runtime",
    "create_coordinator_app": ".coordinator",
    "create_transport_app": ".transport",
    "node_lifespan": ".transport",
}


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value  # once loaded, a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


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
