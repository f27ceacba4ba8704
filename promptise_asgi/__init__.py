"""promptise-asgi: run, discover and steer distributed agent processes over HTTP.

Everything public is importable from here as well as from its own module (SPEC section 1). The names load
lazily, on first use, so `import promptise_asgi.runtime` loads no web stack and the command line owns Ctrl-C a
moment after it starts, not once the whole web stack has loaded. `app` is the node that
`uvicorn promptise_asgi:app` serves, a real module attribute built from the environment when its lifespan
starts (servers look it up in the module's namespace).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._module_app import app
from ._version import __version__

if TYPE_CHECKING:
    from ._errors import ConfigError, PromptiseASGIError, QueueFullError
    from .client import (
        Change,
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

# Where each public name lives; `__getattr__` imports it from there the first time it is asked for.
_LAZY = {
    "AgentProcess": ".runtime",
    "AgentRuntime": ".runtime",
    "AppServer": ".transport",
    "Change": ".client",
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

__all__ = [
    "AgentProcess",
    "AgentRuntime",
    "AppServer",
    "Change",
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


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'promptise_asgi' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value  # the next lookup is a plain module attribute
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
