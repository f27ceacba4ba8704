"""Service discovery: how nodes find each other.

Every backend satisfies the `ProcessDiscovery` Protocol and hands out `DiscoveredNode` records:
`StaticDiscovery` (a fixed topology), `RegistryDiscovery` (an in-process TTL registry) and
`CoordinatorDiscovery` (a coordinator's registry over HTTP); `EtcdDiscovery` lives in `promptise_asgi.etcd`.
Optional abilities are Protocols of their own (`SupportsHeartbeat`, `SupportsWatch`). Runs on asyncio and trio.
"""

from __future__ import annotations

from ._base import (
    DiscoveredNode,
    HasEndpoints,
    HasTTL,
    NodeChange,
    ProcessDiscovery,
    ReportsWatchError,
    SupportsAclose,
    SupportsHeartbeat,
    SupportsWatch,
)
from ._coordinator import CoordinatorDiscovery
from ._registry import RegistryDiscovery
from ._static import StaticDiscovery

__all__ = [
    "CoordinatorDiscovery",
    "DiscoveredNode",
    "HasEndpoints",
    "HasTTL",
    "NodeChange",
    "ProcessDiscovery",
    "RegistryDiscovery",
    "ReportsWatchError",
    "StaticDiscovery",
    "SupportsAclose",
    "SupportsHeartbeat",
    "SupportsWatch",
]
