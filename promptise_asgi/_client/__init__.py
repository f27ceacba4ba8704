"""The HTTP clients: `NodeClient` for a node, `CoordinatorClient` for a coordinator, and `ChangeStream`, which
reads either's change stream. Public through `promptise_asgi.client`. Knows httpx and the wire formats."""

from __future__ import annotations

from ._coordinator import CoordinatorClient
from ._node import NodeClient
from ._stream import ChangeStream
from ._view import ClusterView

__all__ = ["ChangeStream", "ClusterView", "CoordinatorClient", "NodeClient"]
